"""Instruction fine-tuning: the book's template and collate, the masked loss, the loader's
errors, the shipped data set, and ``jaxllm finetune instruct`` end to end on a tiny base."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from corpus import english
from jaxllm.data.instruct import (SHIPPED_PATH, collate, format_input, format_prompt, load_instructions,
                                  padded_batches, split_instructions, tokenize_instructions,
                                  validate_instructions)
from jaxllm.data.make_instructions import make_instructions, plural
from jaxllm.data.tokenizer import encode, gpt2_encoding
from jaxllm.models import gpt2
from jaxllm.training.losses import lm_cross_entropy
from parity import GRAD, OUTPUT, assert_close

PAD = 50256


# --------------------------------------------------------------------------- template


def test_format_input_is_the_books_template():
    with_input = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
                  "output": "The correct spelling is 'Occasion.'"}
    assert format_input(with_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion")
    without = {"instruction": "What is an antonym of 'complicated'?", "input": "", "output": "'simple'."}
    assert format_input(without) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is an antonym of 'complicated'?")
    assert format_prompt(without) == format_input(without) + "\n\n### Response:\n"


def test_prompt_and_response_tokens_equal_the_whole_text_encoded():
    enc = gpt2_encoding()
    records = load_instructions()[:50]
    token_lists, prompt_lengths = tokenize_instructions(enc, records)
    for record, ids, n in zip(records, token_lists, prompt_lengths):
        assert ids == encode(enc, format_prompt(record) + record["output"])
        assert ids[:n] == encode(enc, format_prompt(record))


# --------------------------------------------------------------------------- collate


def book_collate(batch, pad_token_id=PAD, ignore_index=-100, allowed_max_length=None):
    """Raschka ch. 7 ``custom_collate_fn``, transcribed (torch, device dropped)."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).numpy(), torch.stack(targets_lst).numpy()


def test_collate_pads_with_end_of_text_and_keeps_only_the_first_padding_target():
    out = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=PAD)  # the book's example
    np.testing.assert_array_equal(out["inputs"], [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]])
    np.testing.assert_array_equal(out["targets"], [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100],
                                                   [8, 9, PAD, -100, -100]])
    assert out["inputs"].dtype == out["targets"].dtype == np.int32


@pytest.mark.parametrize("max_length", [None, 3, 7, 40])
def test_collate_matches_the_books_collate_fn(max_length):
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 1000, size=n).tolist() for n in (1, 9, 4, 17, 12)]
    inputs, targets = book_collate([list(b) for b in batch], allowed_max_length=max_length)
    out = collate(batch, pad_id=PAD, max_length=max_length)
    np.testing.assert_array_equal(out["inputs"], inputs)
    np.testing.assert_array_equal(out["targets"], targets)


def test_collate_truncates_to_max_length_and_pads_to_a_fixed_length():
    out = collate([[1, 2, 3, 4, 5, 6], [7, 8]], pad_id=0, max_length=4)
    np.testing.assert_array_equal(out["inputs"], [[1, 2, 3, 4], [7, 8, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[2, 3, 4, 5], [8, 0, -100, -100]])  # row 0 lost its end
    wide = collate([[1, 2, 3], [7, 8]], pad_id=0, length=6)
    np.testing.assert_array_equal(wide["inputs"], [[1, 2, 3, 0, 0, 0], [7, 8, 0, 0, 0, 0]])
    np.testing.assert_array_equal(wide["targets"], [[2, 3, 0, -100, -100, -100], [8, 0, -100, -100, -100, -100]])


def test_collate_masks_the_prompt_targets():
    # prompts of 3 and 1 tokens: the targets predicting tokens 1..2 of the first prompt are ignored
    out = collate([[10, 11, 12, 20, 21], [13, 22]], pad_id=0, prompt_lengths=[3, 1])
    np.testing.assert_array_equal(out["targets"], [[-100, -100, 20, 21, 0], [22, 0, -100, -100, -100]])
    cut = collate([[10, 11, 12, 13, 20]], pad_id=0, prompt_lengths=[4], max_length=2)  # prompt beyond the cut
    np.testing.assert_array_equal(cut["targets"], [[-100, -100]])


def test_collate_and_padded_batches_refuse_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="token list 1 is empty"):
        collate([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        collate([[1]], pad_id=0, max_length=0)
    with pytest.raises(ValueError, match="2 prompt lengths for 1"):
        collate([[1]], pad_id=0, prompt_lengths=[1, 1])
    with pytest.raises(ValueError, match="batch_size"):
        padded_batches(collate([[1]], pad_id=0), 0, pad_id=0)


def test_padded_batches_fill_the_last_batch_with_ignored_rows():
    arrays = collate([[1, 2], [3], [4, 5]], pad_id=9)
    batches = padded_batches(arrays, 2, pad_id=9)
    assert [b["inputs"].shape for b in batches] == [(2, 2), (2, 2)]
    np.testing.assert_array_equal(batches[1]["inputs"][1], [9, 9])
    np.testing.assert_array_equal(batches[1]["targets"][1], [-100, -100])
    np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches])[:3], arrays["targets"])


# --------------------------------------------------------------------------- masked loss


@pytest.fixture(scope="module")
def tiny_gpt2():
    config = gpt2.tiny(vocab_size=40, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    params = config.init(jax.random.PRNGKey(0))
    model = config.build()
    return config, params, lambda p, tokens: model.apply({"params": p}, tokens)[0]


def _batch(mask_prompt=False):
    rows = [[3, 5, 7, 9, 11, 13], [4, 6, 8], [2, 3, 4, 5]]
    return collate(rows, pad_id=39, length=10, prompt_lengths=[3, 2, 2] if mask_prompt else None)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_ignored_positions_change_neither_loss_nor_gradients(tiny_gpt2, mask_prompt):
    _, params, logits_fn = tiny_gpt2
    loss_fn = jax.value_and_grad(lm_cross_entropy(logits_fn, pad_id=-100), has_aux=True)
    batch = _batch(mask_prompt)
    (loss, aux), grads = loss_fn(params, batch, None)
    assert int(aux["targets"]) == int((batch["targets"] != -100).sum())

    # The tail of each row (after its last scored target) is ignored: whatever its tokens, and so
    # its logits (causal attention: nothing earlier sees them), loss and gradients stay the same.
    scored = batch["targets"] != -100
    last = np.array([np.nonzero(r)[0].max() for r in scored])
    changed = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(1)
    for row, end in enumerate(last):
        changed["inputs"][row, end + 1:] = rng.integers(0, 39, size=changed["inputs"].shape[1] - end - 1)
    assert (changed["inputs"] != batch["inputs"]).any()
    (loss2, _), grads2 = loss_fn(params, changed, None)
    # the same operations on the scored positions (bit-identical here): far tighter than OUTPUT / GRAD,
    # so that even a tiny leak from the ignored tail would show
    assert float(loss2) == pytest.approx(float(loss), abs=1e-7)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), grads, grads2)

    # Scoring one of those positions does change both: the invariance comes from the ignore index.
    row = 1
    changed["targets"][row, last[row] + 1] = 7
    (loss3, _), grads3 = loss_fn(params, changed, None)
    assert abs(float(loss3) - float(loss)) > 1e-4
    assert not np.allclose(grads3["out_head"]["kernel"], grads["out_head"]["kernel"], atol=1e-6)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_masked_loss_equals_torch_cross_entropy_with_ignore_index(tiny_gpt2, mask_prompt):
    _, params, logits_fn = tiny_gpt2
    batch = _batch(mask_prompt)
    loss, _ = lm_cross_entropy(logits_fn, pad_id=-100)(params, batch, None)
    logits = torch.tensor(np.asarray(logits_fn(params, jnp.asarray(batch["inputs"]))))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(batch["targets"]).flatten().long())
    assert_close(float(loss), float(expected), OUTPUT, err_msg="vs torch cross_entropy")  # the book's calc_loss_batch

    # and the gradient is that of the mean over the scored positions, picked out by index
    rows, cols = np.nonzero(batch["targets"] != -100)

    def reference(p):
        logp = jax.nn.log_softmax(logits_fn(p, batch["inputs"]))
        return -jnp.mean(logp[rows, cols, batch["targets"][rows, cols]])

    got = jax.grad(lambda p: lm_cross_entropy(logits_fn, pad_id=-100)(p, batch, None)[0])(params)
    jax.tree_util.tree_map(lambda a, b: assert_close(a, b, GRAD, err_msg="masked-mean vs indexed-mean gradient"),
                           got, jax.grad(reference)(params))


# --------------------------------------------------------------------------- loading and splitting


def _write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"instruction": "x", "output": "y"}, "must be a JSON list"),
    ([], "holds no records"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"record 1 lacks the key\(s\) \['output'\]"),
    ([{"instruction": "a", "input": 3, "output": "b"}], "record 0: 'input' must be a string, got int"),
    ([{"instruction": "a", "output": ["b"]}], "record 0: 'output' must be a string"),
    ([{"instruction": " ", "output": "b"}], "record 0: 'instruction' is empty"),
    (["just text"], "record 0 must be an object"),
    ("[{\"instruction\": ", "not valid UTF-8 JSON"),
])
def test_loader_refuses_bad_files_naming_the_record(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_instructions(_write(tmp_path, data))


def test_loader_accepts_alpaca_records_with_or_without_input(tmp_path):
    records = load_instructions(_write(tmp_path, [{"instruction": "a", "output": "b"},
                                                  {"instruction": "c", "input": "d", "output": "", "id": 7}]))
    assert records == [{"instruction": "a", "input": "", "output": "b"},
                       {"instruction": "c", "input": "d", "output": "", "id": 7}]
    with pytest.raises(ValueError, match="no instruction file"):
        load_instructions(tmp_path / "missing.json")


def test_split_is_the_books_85_10_5_and_deterministic():
    records = [{"instruction": str(i), "input": "", "output": ""} for i in range(100)]
    train, test, val = split_instructions(records, seed=3)
    assert (len(train), len(test), len(val)) == (85, 10, 5)
    assert sorted(r["instruction"] for r in train + test + val) == sorted(r["instruction"] for r in records)
    assert split_instructions(records, seed=3) == (train, test, val)
    assert split_instructions(records, seed=None)[0] == records[:85]  # the book's order-preserving split
    assert [len(part) for part in split_instructions(records[:3])] == [1, 1, 1]
    with pytest.raises(ValueError, match="need at least 3"):
        split_instructions(records[:2])


# --------------------------------------------------------------------------- the shipped data set


def test_shipped_data_is_what_the_generator_writes():
    assert make_instructions(seed=0) == make_instructions(seed=0)
    assert make_instructions(seed=1) != make_instructions(seed=0)
    shipped = load_instructions(SHIPPED_PATH)
    assert shipped == validate_instructions(make_instructions(seed=0))
    assert 300 <= len(shipped) <= 600
    assert len({(r["instruction"], r["input"]) for r in shipped}) == len(shipped)
    assert 0.2 < np.mean([bool(r["input"]) for r in shipped]) < 0.8  # with and without input


def _numbers(text):
    return [int(n) for n in re.findall(r"\d+", text)]


# unit facts written out here, not taken from the generator
FACTORS = {("kilometer", "meter"): 1000, ("meter", "centimeter"): 100, ("kilogram", "gram"): 1000,
           ("hour", "minute"): 60, ("minute", "second"): 60, ("day", "hour"): 24, ("week", "day"): 7,
           ("liter", "milliliter"): 1000, ("year", "month"): 12}

# (instruction pattern, input pattern or None, check(match groups, input, output)) recomputed here
CHECKS = {
    "addition": (r"What is (\d+) plus (\d+)\?$",
                 lambda g, i, o: o == f"{g[0]} plus {g[1]} is {int(g[0]) + int(g[1])}."),
    "addition_input": (r"Add the two numbers\.$", lambda g, i, o: int(o) == sum(_numbers(i))),
    "subtraction": (r"What is (\d+) minus (\d+)\?$", lambda g, i, o: int(o.split()[-1][:-1]) == int(g[0]) - int(g[1])),
    "product": (r"What is the product of the two numbers\?$", lambda g, i, o: int(o) == np.prod(_numbers(i))),
    "larger": (r"Which number is larger: (\d+) or (\d+)\?$",
               lambda g, i, o: _numbers(o) == sorted(map(int, g), reverse=True)),
    "smaller": (r"Which of the two numbers is smaller\?$", lambda g, i, o: int(o) == min(_numbers(i))),
    "parity": (r"Is (\d+) even or odd\?$", lambda g, i, o: o.endswith("even." if int(g[0]) % 2 == 0 else "odd.")),
    "parity_input": (r"Classify the number as even or odd\.$",
                     lambda g, i, o: o == ("even" if int(i) % 2 == 0 else "odd")),
    "reverse": (r"Reverse the order of the words\.$", lambda g, i, o: o.split() == i.split()[::-1]),
    "sort": (r"Sort these words alphabetically\.$", lambda g, i, o: o.split(", ") == sorted(i.split(", "))),
    "upper": (r"Rewrite the text in capital letters\.$", lambda g, i, o: o == i.upper()),
    "letters": (r'How many letters are in the word "(\w+)"\?$', lambda g, i, o: _numbers(o) == [len(g[0])]),
    "backwards": (r'Spell the word "(\w+)" backwards\.$', lambda g, i, o: o == g[0][::-1]),
    "convert": (r"Convert (\d+) (\w+?)s? to (\w+)s\.$", lambda g, i, o: _numbers(o) == [
        int(g[0]), int(g[0]) * FACTORS[g[1], g[2]]] and re.search(rf" {g[2]}s?\.$", o)),
    "how_many": (r"How many (\w+)s are in the given amount\?$", lambda g, i, o: _numbers(o) == [
        _numbers(i)[0] * FACTORS[re.sub("s$", "", i.split()[1]), g[0]]]),
    "passive": (r"Rewrite the sentence in the passive voice\.$", lambda g, i, o: re.fullmatch(
        r"The {2} (was|were) \w+ by the {0}\.".format(*re.fullmatch(r"The (\w+) (\w+) the (\w+)\.", i).groups()), o)),
}


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_shipped_answers_are_correct(kind):
    pattern, check = CHECKS[kind]
    matched = 0
    for r in load_instructions(SHIPPED_PATH):
        m = re.match(pattern, r["instruction"])
        if m:
            matched += 1
            assert check(m.groups(), r["input"], r["output"]), r
    assert matched >= 5, f"only {matched} records of kind {kind}"


def test_plural_rules():
    assert [plural(w) for w in ("box", "city", "day", "mouse", "wolf", "church", "cat")] == [
        "boxes", "cities", "days", "mice", "wolves", "churches", "cats"]


# --------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A GPT-2 base (tiny preset, 3 steps, its own 300-token BPE) written by ``jaxllm train lm``."""
    from jaxllm.jobs import lm

    root = tmp_path_factory.mktemp("base")
    corpus = root / "corpus.txt"
    corpus.write_text(english() * 3)
    out = root / "lm"
    lm.main(["--text", str(corpus), "--model", "gpt2", "--preset", "tiny", "--steps", "3", "--vocab-size", "300",
             "--context", "256", "--batch-size", "4", "--warmup-steps", "0", "--d-model", "32", "--heads", "2",
             "--sample-tokens", "4", "--eval-batch-size", "4", "--no-progress", "--out", str(out)])
    return out


@pytest.fixture
def small_data(tmp_path):
    return _write(tmp_path, load_instructions(SHIPPED_PATH)[:40], "small.json")


def test_instruct_script_end_to_end(load_script, tiny_base, small_data, tmp_path):
    out = tmp_path / "instruct"
    summary = load_script("instruct").main([
        "--base", str(tiny_base), "--data", str(small_data), "--out", str(out), "--steps", "8", "--lr", "3e-3",
        "--eval-every", "4", "--max-new-tokens", "6", "--eval-batch-size", "4", "--no-progress"])
    assert summary["records"] == {"total": 40, "train": 34, "test": 4, "val": 2, "truncated": 0}
    assert summary["max_length"] == 256  # the base's training context
    assert summary["val_loss_last"] < summary["val_loss_first"]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [4, 8]
    assert (out / "loss.png").stat().st_size > 0
    answered = json.loads((out / "test_responses.json").read_text())
    assert len(answered) == 4
    for record in answered:
        assert set(record) == {"instruction", "input", "output", "model_response"}
        assert isinstance(record["model_response"], str)
    # the output directory is a base in its own right
    from jaxllm.pretrained import load_base

    assert load_base(out).source == f"run:{out}@8"


def test_lora_instruct_trains_only_adapters_saved_apart_and_merged_on_load(load_script, tiny_base, small_data,
                                                                          tmp_path):
    from jaxllm.nn import lora
    from jaxllm.pretrained import load_base, load_run

    out = tmp_path / "lora"
    summary = load_script("instruct").main([
        "--base", str(tiny_base), "--data", str(small_data), "--out", str(out), "--steps", "6", "--lr", "1e-2",
        "--mode", "lora", "--rank", "4", "--alpha", "8", "--max-new-tokens", "4", "--eval-batch-size", "4",
        "--no-progress"])
    assert summary["mode"] == "lora" and summary["val_loss_last"] < summary["val_loss_first"]
    _, base, _, _ = load_run(str(tiny_base))
    adapted, cfg = lora.load_lora(out / "adapters.safetensors", base)
    assert (cfg.rank, cfg.alpha) == (4, 8.0)
    assert summary["trainable_params"] == sum(x.size for x in jax.tree_util.tree_leaves(lora.lora_state(adapted)))
    config, merged, _, step = load_run(str(out))  # the run is a base: its checkpoint merged on load
    assert step == 6 and load_base(out).source == f"run:{out}@6"
    expected = lora.merge(adapted, cfg)
    for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (merged, expected))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=str(path))
    moved = [not np.allclose(np.asarray(m), np.asarray(b)) for m, b in
             zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(base))]
    assert any(moved)  # the adapters trained; and nothing else did:
    unmerged = lora.without_lora(lora.unmerge(merged, adapted, cfg))
    for a, b in zip(jax.tree_util.tree_leaves(unmerged), jax.tree_util.tree_leaves(base)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_instruct_script_refuses_bad_input(load_script, tiny_base, small_data, tmp_path):
    instruct = load_script("instruct")
    with pytest.raises(ValueError, match="no base model directory .*make demo"):
        instruct.main(["--base", str(tmp_path / "missing"), "--data", str(small_data), "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="holds no records"):
        instruct.main(["--base", str(tiny_base), "--data", str(_write(tmp_path, [])), "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="need at least 3"):
        two = _write(tmp_path, [{"instruction": "a", "output": "b"}] * 2, "two.json")
        instruct.main(["--base", str(tiny_base), "--data", str(two), "--out", str(tmp_path / "c")])
    with pytest.raises(ValueError, match=r"--max-length must lie in \[2, 256\]"):
        instruct.main(["--base", str(tiny_base), "--data", str(small_data), "--max-length", "257",
                       "--out", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="exceeds the 34 training records"):
        instruct.main(["--base", str(tiny_base), "--data", str(small_data), "--batch-size", "35",
                       "--out", str(tmp_path / "e")])
