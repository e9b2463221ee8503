"""Count-based models: the book's ch. 2 model (hand-checked) and the Kneser-Ney baseline."""

import itertools
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from jaxllm.models.ngram import BookCountLM, KneserNeyLM, book_tokens
from jaxllm.training.lm_eval import bits_per_char

# ---- book tokenizer ------------------------------------------------------------------------------


def test_book_tokens_lowercases_and_keeps_words_numbers_and_full_stops():
    text = "Hello, World! It's 2024... e-mail: A.B; done?"
    assert book_tokens(text) == [
        "hello", "world", "it", "s", "2024", ".", ".", ".", "e", "mail", "a", ".", "b", "done",
    ]
    assert book_tokens("") == []


# ---- book model, checked by hand -----------------------------------------------------------------

# Training text "a b c a b d", n = 3.  N = 6 tokens, V = 4 types {a, b, c, d}.
#   unigrams: a 2, b 2, c 1, d 1
#   bigrams : ab 2, bc 1, ca 1, bd 1          -> as a prefix: a 2, b 2, c 1   (d ends the text)
#   trigrams: abc 1, bca 1, cab 1, abd 1      -> as a prefix: ab 2, bc 1, ca 1
TRAIN = "a b c a b d".split()


def test_book_model_perplexity_matches_hand_computation():
    lm = BookCountLM(n=3).fit(TRAIN)
    test = "a b d a b c e".split()
    by_hand = [
        Fraction(2 + 1, 6 + 4),  # a | ()      : no context -> add-one unigram (2+1)/(6+4)
        Fraction(2, 2),          # b | a       : only 1 token of history -> bigram ab / a-prefix
        Fraction(1, 2),          # d | a b     : trigram abd 1 / ab-prefix 2
        Fraction(2 + 1, 6 + 4),  # a | b d     : bda unseen, da unseen -> add-one fallback
        Fraction(2, 2),          # b | d a     : dab unseen -> SHORTER context: ab 2 / a-prefix 2
        Fraction(1, 2),          # c | a b     : abc 1 / ab-prefix 2
        Fraction(0 + 1, 6 + 4),  # e | b c     : e never seen in training -> (0+1)/(6+4)
    ]
    for i, (tok, p) in enumerate(zip(test, by_hand)):
        assert lm.prob(test[max(0, i - 2) : i], tok) == pytest.approx(float(p), rel=1e-12)
    product = math.prod(by_hand)  # = 9/4000
    assert product == Fraction(9, 4000)
    expected = (4000 / 9) ** (1 / 7)  # exp(-mean log p) = product ** (-1/7)
    assert lm.perplexity(test) == pytest.approx(expected, rel=1e-12)


def test_book_model_longest_context_wins_and_default_n_is_5():
    lm = BookCountLM().fit(TRAIN)
    assert lm.n == 5
    # Context "c a b" (trigram-level context) -> 4-gram "c a b d" seen once after "c a b" once.
    assert lm.prob("c a b".split(), "d") == pytest.approx(1.0)
    # Only the last n-1 = 4 tokens matter: an extra unseen prefix changes nothing.
    assert lm.prob("zzz b c a b".split(), "d") == lm.prob("b c a b".split(), "d")
    # Context "b c a b" -> "b c a b d" seen once, prefix "b c a b" once.
    assert lm.prob("b c a b".split(), "d") == pytest.approx(1.0)


def test_book_model_scores_can_sum_to_more_than_one():
    # After "x a" the model has only ever seen "b", so p(b | x a) = 1; "c" was never seen after
    # "x a" but was seen after "a", so it is scored p(c | a) = 1/2 on top: the scores are not a
    # distribution.
    lm = BookCountLM(n=3).fit("x a b . y a c .".split())
    vocab = ["x", "a", "b", "c", "y", "."]
    scores = {w: lm.prob(["x", "a"], w) for w in vocab}
    assert scores["b"] == pytest.approx(1.0)
    assert scores["c"] == pytest.approx(0.5)
    assert sum(scores.values()) > 1.5


def test_book_model_bad_input():
    with pytest.raises(ValueError, match="empty"):
        BookCountLM().fit([])
    with pytest.raises(ValueError, match="n must"):
        BookCountLM(n=0)


# ---- Kneser-Ney -------------------------------------------------------------------------------------


def reference_kn(train, vocab_size, order, discount, context, token):
    """Interpolated KN straight from its definition, with dict counts (slow, tiny inputs only)."""
    train = [int(t) for t in train]
    grams = {k: Counter(tuple(train[i : i + k]) for i in range(len(train) - k + 1)) for k in range(1, order + 2)}

    def count(k, gram):  # raw count at the top level, continuation count below it
        if k == order:
            return grams[k][gram]
        return sum(1 for g in grams[k + 1] if g[1:] == gram)

    def prob(k, h, w):
        if k == 0:
            return 1.0 / vocab_size
        cs = [count(k, h + (v,)) for v in range(vocab_size)]
        total = sum(cs)
        if total == 0:
            return prob(k - 1, h[1:], w)
        types = sum(c > 0 for c in cs)
        return (max(cs[w] - discount, 0) + discount * types * prob(k - 1, h[1:], w)) / total

    h = tuple(int(t) for t in context)[-(order - 1) :] if order > 1 else ()
    return prob(len(h) + 1, h, token)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kn_matches_reference_and_is_normalised(order):
    rng = np.random.default_rng(order)
    V = 6
    train = rng.integers(0, V - 1, size=40)  # id V-1 never occurs in training
    lm = KneserNeyLM(order=order, vocab_size=V).fit(train)
    contexts = [
        [],                          # empty context
        list(train[-3:]),            # seen, ends the text
        list(train[5:8]),            # seen
        [V - 1, V - 1, V - 1],       # unseen (contains an id absent from training)
        [0, 1, 2, 3, 4, 0, 1],       # longer than order - 1: only the tail is used
        [int(train[0])],             # short context
    ]
    for ctx in contexts:
        dist = lm.distribution(ctx)
        assert dist.shape == (V,)
        assert abs(dist.sum() - 1.0) < 1e-9
        assert np.all(dist > 0)
        ref = [reference_kn(train, V, order, 0.75, ctx, w) for w in range(V)]
        np.testing.assert_allclose(dist, ref, rtol=1e-12)


def test_kn_normalised_on_many_contexts_bigger_vocab():
    rng = np.random.default_rng(0)
    V = 50
    train = rng.integers(0, 20, size=3000)
    for order in (1, 2, 3, 4):
        lm = KneserNeyLM(order=order, vocab_size=V).fit(train)
        for ctx in itertools.chain([[]], (train[i : i + 3] for i in range(0, 300, 7)),
                                   (rng.integers(0, V, size=3) for _ in range(20))):
            dist = lm.distribution(ctx)
            assert abs(dist.sum() - 1.0) < 1e-9
            assert dist.min() > 0


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kn_logprob_agrees_with_distribution(order):
    rng = np.random.default_rng(10 + order)
    V = 12
    train = rng.integers(0, V, size=500)
    test = np.concatenate([train[100:140], rng.integers(0, V, size=40)])  # seen and fresh text
    lm = KneserNeyLM(order=order, vocab_size=V).fit(train)
    lp = lm.logprob(test)
    assert lp.shape == test.shape
    for t in range(test.size):
        ctx = test[max(0, t - order + 1) : t]  # the first token is scored with an empty context
        assert lp[t] == pytest.approx(math.log(lm.distribution(ctx)[test[t]]), rel=1e-10, abs=1e-12)
    assert lm.total_nll(test) == pytest.approx(-lp.sum())
    assert lm.logprob([]).shape == (0,)


def _phrase_source(rng, num_tokens, V=60, num_phrases=15, length=6):
    """A repetitive synthetic source: concatenations of a few fixed random phrases."""
    phrases = np.random.default_rng(123).integers(0, V, size=(num_phrases, length))
    picks = rng.integers(0, num_phrases, size=num_tokens // length + 1)
    return phrases[picks].reshape(-1)[:num_tokens]


def test_kn_beats_add_one_unigram_and_higher_order_helps():
    V = 60
    train = _phrase_source(np.random.default_rng(1), 20_000)
    held_out = _phrase_source(np.random.default_rng(2), 3_000)
    counts = np.bincount(train, minlength=V)
    add_one_nll = -np.log((counts[held_out] + 1) / (train.size + V)).sum()
    nll = {o: KneserNeyLM(order=o, vocab_size=V).fit(train).total_nll(held_out) for o in (1, 3)}
    assert nll[3] < add_one_nll
    assert nll[3] < 0.6 * nll[1]  # phrases are near-deterministic given two ids


def test_kn_sample_is_deterministic_and_in_range():
    train = _phrase_source(np.random.default_rng(1), 5_000)
    lm = KneserNeyLM(order=3, vocab_size=60).fit(train)
    a = lm.sample(train[:2], 50, rng=np.random.default_rng(7))
    b = lm.sample(train[:2], 50, rng=np.random.default_rng(7))
    assert a.shape == (50,) and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < 60
    assert lm.sample([], 0, rng=0).shape == (0,)


def test_kn_bad_input():
    with pytest.raises(ValueError, match="order"):
        KneserNeyLM(order=0, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        KneserNeyLM(order=3)
    with pytest.raises(ValueError, match="discount"):
        KneserNeyLM(order=3, vocab_size=10, discount=0.0)
    lm = KneserNeyLM(order=3, vocab_size=10)
    with pytest.raises(ValueError, match="empty"):
        lm.fit([])
    with pytest.raises(ValueError, match="not fitted"):
        lm.distribution([])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        lm.fit([1, 2, 10])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        lm.fit([1, -1, 2])
    with pytest.raises(ValueError, match="integers"):
        lm.fit([1.5, 2.0])
    lm.fit([1, 2, 3, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        lm.logprob([1, 12])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        lm.distribution([99])
    with pytest.raises(ValueError, match="1-D"):
        lm.logprob([[1, 2]])


# ---- bits per character ------------------------------------------------------------------------------


def test_bits_per_char():
    # 1000 chars coded in 1000 * ln 2 nats = 1000 bits -> exactly 1 bit per char.
    assert bits_per_char(1000 * math.log(2), 1000) == pytest.approx(1.0)
    assert bits_per_char(3 * math.log(2), 4) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="num_chars"):
        bits_per_char(1.0, 0)
    with pytest.raises(ValueError, match="finite"):
        bits_per_char(float("nan"), 10)
