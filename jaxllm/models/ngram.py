"""Count-based language models: Burkov's ch. 2 model and a normalised Kneser-Ney baseline.

Plain numpy / Python, no JAX: these are counting models, there is nothing to differentiate.

* :class:`BookCountLM` is the book's model, kept exactly as described (strings, "longest seen
  context", add-one unigram fallback). It is a faithful reproduction, not a proper language
  model: its scores do not form a distribution, so its perplexity cannot be compared with anything
  else.
* :class:`KneserNeyLM` is the baseline to compare the neural models against: interpolated
  Kneser-Ney over the same integer token ids they use, normalised over the whole vocabulary.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from jaxllm.validate import check_token_ids

# Burkov ch. 2: words/numbers, plus the full stop as its own token; everything else is dropped.
_BOOK_TOKEN_RE = re.compile(r"\b[a-zA-Z0-9]+\b|[.]")


def book_tokens(text: str) -> list[str]:
    """The book's tokenizer: lowercase, then keep runs of ``[a-z0-9]`` and ``.``.

    Case, whitespace and all other punctuation are lost, so the token stream is not a lossless
    encoding of ``text`` (another reason the book model's perplexity is not comparable).
    """
    return _BOOK_TOKEN_RE.findall(text.lower())


class BookCountLM:
    """Burkov's count-based model (ch. 2), reproduced as the book describes it.

    ``fit`` counts every k-gram for k = 1..n. A token ``w`` after history ``h`` is scored from the
    LONGEST suffix ``c`` of ``h`` (at most ``n - 1`` tokens) such that ``c + (w,)`` was seen in
    training::

        p(w | h) = count(c + (w,)) / count(c as a prefix)

    where "count(c as a prefix)" is the number of (len(c)+1)-grams that start with ``c`` (i.e. how
    often ``c`` was followed by *something*; this differs from ``count(c)`` only when ``c`` ends
    the training text). No discounting. If ``w`` never followed any suffix of ``h``, the score is
    the add-one unigram ``(count(w) + 1) / (N + V)`` with ``N`` = number of training tokens and
    ``V`` = number of distinct training tokens. A token never seen in training gets the same
    add-one unigram with ``count(w) = 0``, i.e. ``1 / (N + V)`` (``V`` is not enlarged for it).

    NOT a normalised distribution: each token picks its *own* context (the longest one it was seen
    after), so different tokens are scored by different conditional distributions and the scores
    over the vocabulary can sum to more than 1 (e.g. after ``(x, a)`` the token seen there gets
    1.0, while another token seen only after ``(a,)`` adds its bigram probability on top). Its
    perplexity is therefore optimistic and NOT comparable with the perplexity or NLL of any other
    model (nor is it comparable across tokenizers: this one drops case and most punctuation).
    Book result: test perplexity 299.06 on Brown (90/10 split, unshuffled).
    """

    def __init__(self, n: int = 5):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        self.n = int(n)
        self._counts: list[Counter] = []  # _counts[k][k-gram tuple] for k = 1..n (index 0 unused)
        self._prefix: list[Counter] = []  # _prefix[k][k-gram] = number of (k+1)-grams it starts
        self.num_tokens = 0
        self.vocab_size = 0

    def fit(self, tokens) -> "BookCountLM":
        """tokens: sequence of str (e.g. from :func:`book_tokens`). Returns self."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("training tokens are empty")
        T = len(tokens)
        self._counts = [Counter()] + [
            Counter(tuple(tokens[i : i + k]) for i in range(T - k + 1)) for k in range(1, self.n + 1)
        ]
        self._prefix = [Counter() for _ in range(self.n + 1)]
        for k in range(2, self.n + 1):
            for gram, c in self._counts[k].items():
                self._prefix[k - 1][gram[:-1]] += c
        self.num_tokens = T
        self.vocab_size = len(self._counts[1])
        return self

    def _check_fitted(self):
        if not self.num_tokens:
            raise ValueError("BookCountLM is not fitted; call fit(tokens) first")

    def prob(self, context_tokens, token: str) -> float:
        """Score of ``token`` after ``context_tokens`` (only the last ``n - 1`` are used)."""
        self._check_fitted()
        ctx = tuple(context_tokens)[-(self.n - 1) :] if self.n > 1 else ()
        for k in range(len(ctx), 0, -1):  # longest context first
            c_ctx = ctx[len(ctx) - k :]
            c = self._counts[k + 1].get(c_ctx + (token,), 0)
            if c > 0:
                return c / self._prefix[k][c_ctx]
        unigram = self._counts[1].get((token,), 0)
        return (unigram + 1) / (self.num_tokens + self.vocab_size)

    def perplexity(self, tokens) -> float:
        """``exp(-mean_i log p(t_i | t_{i-n+1..i-1}))`` over every position of ``tokens``.

        The first ``n - 1`` positions use the shorter history that is available (the very first
        token has no context and gets the add-one unigram).
        """
        tokens = list(tokens)
        if not tokens:
            raise ValueError("tokens to score are empty")
        total = 0.0
        for i, tok in enumerate(tokens):
            total += math.log(self.prob(tokens[max(0, i - self.n + 1) : i], tok))
        return math.exp(-total / len(tokens))


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query in ``sorted_keys`` or -1. Shapes: [K], [Q] -> int64[Q]."""
    if sorted_keys.size == 0:
        return np.full(queries.shape, -1, np.int64)
    idx = np.searchsorted(sorted_keys, queries)
    idx_c = np.minimum(idx, sorted_keys.size - 1)
    return np.where(sorted_keys[idx_c] == queries, idx_c, -1).astype(np.int64)


class KneserNeyLM:
    """Interpolated Kneser-Ney n-gram model over integer ids ``[0, vocab_size)``, normalised.

    Levels k = 1..order, each with its own context ``h`` (the previous k-1 ids), interpolated
    down to a uniform distribution over all ``vocab_size`` ids (level 0)::

        P_0(w)     = 1 / vocab_size
        P_k(w | h) = (max(c_k(h w) - D, 0) + D * N1+(h .) * P_{k-1}(w | h')) / c_k(h .)
                   = P_{k-1}(w | h')      if c_k(h .) == 0 (context unseen at this level)

    where ``h'`` drops the oldest id of ``h``, ``c_k`` is the raw count at the top level
    (k = order) and the continuation count (number of distinct ids seen just before ``h w``) at
    lower levels, ``c_k(h .) = sum_w c_k(h w)`` and ``N1+(h .)`` = number of ``w`` with
    ``c_k(h w) > 0``. Each level is a mixture of normalised distributions, so every P_k sums to
    exactly 1 and, thanks to the uniform base, every id (seen or not) has probability > 0.

    A single fixed discount ``D`` (default 0.75) is used at every level: plain interpolated KN,
    not modified KN (three count-dependent discounts), for simplicity; modified KN would be a
    little better. ``0 < D <= 1`` keeps every probability positive.

    Histories shorter than ``order - 1`` (the first ids of a sequence) start at the level their
    length allows, i.e. they use the lower-order (continuation-count) distribution; there is no
    begin-of-sequence token. The first id of a sequence is scored by the unigram level.

    Storage: level k keeps its distinct k-grams as sorted int64 keys ``rank_{k-1}(h) * V + w``
    where ``rank_{k-1}(h)`` is the index of the context among level k-1's sorted keys, so keys
    never overflow whatever the order (they are < num_tokens * V). Scoring is a few
    ``searchsorted`` calls per level, fully vectorised over the sequence.
    """

    def __init__(self, order: int = 3, vocab_size: int | None = None, discount: float = 0.75):
        if not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        if vocab_size is None or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        if not (0.0 < float(discount) <= 1.0):
            raise ValueError(f"discount must lie in (0, 1], got {discount!r}")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.discount = float(discount)
        self._fitted = False

    # ---- fitting -------------------------------------------------------------------------------

    def fit(self, ids) -> "KneserNeyLM":
        """ids: int[num_tokens], one contiguous training stream in ``[0, vocab_size)``. Returns self."""
        x = self._check_ids(ids, "training ids", allow_empty=False)
        N, V, T = self.order, self.vocab_size, x.size
        # keys[k]: sorted distinct k-gram keys; ranks[k][i]: index in keys[k] of x[i:i+k].
        keys: list[np.ndarray] = [np.zeros(1, np.int64)]
        ranks: list[np.ndarray] = [np.zeros(T + 1, np.int64)]
        first: list[np.ndarray] = [np.zeros(1, np.int64)]  # a start position of each distinct k-gram
        raw: list[np.ndarray] = [np.array([T], np.int64)]
        for k in range(1, N + 1):
            m = max(T - k + 1, 0)  # number of k-gram windows
            gram_keys = ranks[k - 1][:m] * V + x[k - 1 : k - 1 + m]
            uniq, fst, inv = np.unique(gram_keys, return_index=True, return_inverse=True)
            keys.append(uniq)
            ranks.append(inv.reshape(-1).astype(np.int64))
            first.append(fst.astype(np.int64))
            raw.append(np.bincount(inv.reshape(-1), minlength=uniq.size))

        self._keys, self._count, self._ctx_total, self._ctx_types = [None], [None], [None], [None]
        for k in range(1, N + 1):
            if k == N:
                count = raw[k]
            else:
                # Continuation count of a k-gram g: number of distinct (k+1)-grams ending in g.
                # The (k+1)-gram starting at f ends in the k-gram starting at f + 1.
                count = np.bincount(ranks[k][first[k + 1] + 1], minlength=keys[k].size)
            count = count.astype(np.float64)
            ctx = keys[k] // V  # rank of the context among level k-1's keys
            n_ctx = keys[k - 1].size
            self._keys.append(keys[k])
            self._count.append(count)
            self._ctx_total.append(np.bincount(ctx, weights=count, minlength=n_ctx))
            self._ctx_types.append(np.bincount(ctx, weights=(count > 0).astype(np.float64), minlength=n_ctx))
        self.num_tokens = T
        self._fitted = True
        return self

    # ---- scoring -------------------------------------------------------------------------------

    def logprob(self, ids) -> np.ndarray:
        """ids: int[L] -> float64[L], ``log P(ids[t] | ids[t-order+1 : t])`` in nats.

        Position t uses the up to ``order - 1`` preceding ids *of this sequence*; position 0 is
        scored by the unigram level. Empty input gives an empty array.
        """
        self._check_fitted()
        y = self._check_ids(ids, "ids", allow_empty=True)
        V, D = self.vocab_size, self.discount
        p = np.full(y.size, 1.0 / V)
        ctx_rank = np.zeros(y.size, np.int64)  # rank of the level-k context of each position
        for k in range(1, self.order + 1):
            seen_ctx = ctx_rank >= 0
            safe_ctx = np.where(seen_ctx, ctx_rank, 0)
            gram = np.where(seen_ctx, _lookup(self._keys[k], safe_ctx * V + y), -1)
            total = np.where(seen_ctx, self._ctx_total[k][safe_ctx], 0.0)
            types = self._ctx_types[k][safe_ctx]
            c = np.where(gram >= 0, self._count[k][np.maximum(gram, 0)], 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                p_k = (np.maximum(c - D, 0.0) + D * types * p) / total
            p = np.where(total > 0, p_k, p)
            # Next level's context at t is the k-gram ending at t - 1 (none for t = 0).
            ctx_rank = np.concatenate([[-1], gram[:-1]]) if y.size else gram
        return np.log(p)

    def total_nll(self, ids) -> float:
        """Sum of ``-logprob(ids)`` in nats (float)."""
        return float(-self.logprob(ids).sum())

    def _context_rank(self, h: np.ndarray) -> int:
        """Index of the (len(h))-gram ``h`` among level len(h)'s keys, or -1 if never seen."""
        r = 0
        for j, tok in enumerate(h, start=1):
            r = int(_lookup(self._keys[j], np.array([r * self.vocab_size + int(tok)], np.int64))[0])
            if r < 0:
                return -1
        return r

    def distribution(self, context_ids=()) -> np.ndarray:
        """context_ids: int[C] (may be empty; only the last ``order - 1`` are used) ->
        float64[vocab_size], the next-id distribution; sums to 1, every entry > 0."""
        self._check_fitted()
        ctx = self._check_ids(context_ids, "context ids", allow_empty=True)
        ctx = ctx[ctx.size - min(ctx.size, self.order - 1) :]
        V, D = self.vocab_size, self.discount
        p = np.full(V, 1.0 / V)
        for k in range(1, ctx.size + 2):
            r = self._context_rank(ctx[ctx.size - (k - 1) :])
            if r < 0 or self._ctx_total[k][r] == 0:
                continue  # unseen context at this level: keep the lower-order distribution
            lo, hi = np.searchsorted(self._keys[k], [r * V, (r + 1) * V])
            c = np.zeros(V)
            c[self._keys[k][lo:hi] - r * V] = self._count[k][lo:hi]
            p = (np.maximum(c - D, 0.0) + D * self._ctx_types[k][r] * p) / self._ctx_total[k][r]
        return p

    def sample(self, context=(), n: int = 1, rng=None) -> np.ndarray:
        """Draw ``n`` ids after ``context`` (int[C]); returns int64[n] (the new ids only).

        ``rng``: a ``np.random.Generator``, a seed, or None.
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        rng = np.random.default_rng(rng)
        hist = [int(t) for t in self._check_ids(context, "context ids", allow_empty=True)]
        out = np.empty(n, np.int64)
        for i in range(n):
            cdf = np.cumsum(self.distribution(hist[len(hist) - min(len(hist), self.order - 1) :]))
            tok = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), self.vocab_size - 1)
            out[i] = tok
            hist.append(tok)
        return out

    # ---- helpers -------------------------------------------------------------------------------

    def _check_fitted(self):
        if not self._fitted:
            raise ValueError("KneserNeyLM is not fitted; call fit(ids) first")

    def _check_ids(self, ids, name: str, *, allow_empty: bool) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            if allow_empty:
                return np.zeros(0, np.int64)
            raise ValueError(f"{name} are empty")
        return check_token_ids(arr, self.vocab_size, name=name).astype(np.int64)
