"""``jaxllm compare``: each job's JAX model and its PyTorch twin trained side by side at tiny sizes
(LoRA classification on a GPT-2 run too).
fp32 trajectories stay within the parity tolerance (AdamW, SGD, and Muon: the torch side runs
jaxllm's Muon, ``torch_side.Muon``); a twin made to differ (one scaled weight, or
momentum 0.95 against 0.9) is reported as parting at the step where it must; the files are written;
bad input is one error line."""

import dataclasses
import json

import pytest

from jaxllm.compare import jobs, torch_side
from jaxllm.training.tensorboard import event_files

pytestmark = pytest.mark.optimized  # trajectories compared against the parity tolerance: compiled as users run

TEXT = ["--vocab-size", "300", "--context", "16", "--batch-size", "8", "--sample-tokens", "8"]
CASES = {
    "lm_decoder": ("lm", ["--preset", "tiny", "--steps", "50", *TEXT]),
    "lm_llama_muon": ("lm", ["--preset", "llama", "--d-model", "32", "--heads", "4", "--optimizer", "muon",
                             "--weight-decay", "0.1", "--steps", "10", *TEXT]),
    "lm_gpt2": ("lm", ["--model", "gpt2", "--d-model", "32", "--layers", "2", "--heads", "2", "--steps", "20", *TEXT]),
    "rnn": ("rnn", ["--emb-dim", "32", "--layers", "1", "--steps", "20", *TEXT]),
    "mlp": ("mlp", ["--steps", "30"]),
    "logreg": ("logreg", ["--steps", "30"]),
    "cnn": ("cnn", ["--dataset", "digits", "--steps", "10"]),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from corpus import english

    path = tmp_path_factory.mktemp("compare") / "corpus.txt"
    path.write_text(english(20_000))
    return str(path)


def compare(job, args, out, corpus=None):
    text = ["--text", corpus] if job in ("lm", "rnn") else []
    return jobs.compare(job, [*args, *text, "--no-progress", "--out", str(out)])


@pytest.mark.parametrize("case", CASES)
def test_fp32_twins_stay_within_the_parity_tolerance(case, corpus, tmp_path, capsys):
    job, args = CASES[case]
    result = compare(job, args, tmp_path, corpus)
    out = capsys.readouterr().out
    assert ("dropout is off (--dropout 0)" in out) == (case == "lm_gpt2")  # GPT-2's masks differ between frameworks
    assert "trajectories: within the parity tolerance at every step" in out
    steps = int(args[args.index("--steps") + 1])
    assert [r["step"] for r in result["rows"]] == list(range(1, steps + 1))
    assert result["parted_at_step"] is None, result["rows"]
    assert all(g["within"] for g in result["gradients_at_step_0"].values())
    assert result["rows"][-1]["jax"] < result["rows"][0]["jax"]  # both trained
    assert 0 < result["rows"][-1]["drift_max"] < 1e-3
    assert set(result["speed"]) == {"jax", "torch"} and all(s["units_per_s"] > 0 for s in result["speed"].values())
    if job in ("lm", "rnn"):
        assert result["continuation"]["identical"] and result["continuation"]["tokens"] > 0
    assert json.load(open(tmp_path / "compare.json"))["rows"] == result["rows"]
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert len(event_files(tmp_path)) == 1


def test_classify_lora_on_a_gpt2_run_trains_only_the_adapters_alike(corpus, tmp_path):
    """The book's appendix E on both sides: a GPT-2 run as the base, a new class head, everything
    frozen but the LoRA adapters of every Linear."""
    from jaxllm.jobs.lm import main as train_lm

    base = tmp_path / "base"
    train_lm(["--model", "gpt2", "--d-model", "32", "--layers", "2", "--heads", "2", "--text", corpus, "--steps", "2",
              "--vocab-size", "300", "--context", "32", "--batch-size", "8", "--sample-tokens", "2", "--no-progress",
              "--out", str(base)])
    data = tmp_path / "sms.tsv"
    data.write_text("".join(f"spam\twin a free prize {i}\nham\tsee you at lunch {i}\n" for i in range(30)))
    result = compare("classify", ["--base", str(base), "--data", str(data), "--format", "sms", "--steps", "8"],
                     tmp_path / "compare")
    assert result["parted_at_step"] is None and result["rows"][-1]["drift_max"] < 1e-4
    trained = {name for name, d in result["drift_per_parameter"].items() if ".lora." in name}
    assert trained and set(result["gradients_at_step_0"]) == trained  # only the adapters get gradients
    frozen = {name: d for name, d in result["drift_per_parameter"].items() if name not in trained}
    assert frozen and all(d["max"] == 0.0 for d in frozen.values())  # unchanged on both sides, bit for bit


def test_a_changed_initial_weight_parts_at_the_first_step(tmp_path, monkeypatch):
    load = torch_side.load_jax_params

    def load_and_change_one(config, twin, *args):
        load(config, twin, *args)
        first = next(twin.parameters())
        first.data.mul_(1.1)

    monkeypatch.setattr(torch_side, "load_jax_params", load_and_change_one)
    result = compare("mlp", ["--steps", "5"], tmp_path)
    assert result["parted_at_step"] == 1
    assert not all(g["within"] for g in result["gradients_at_step_0"].values())


def test_another_momentum_parts_at_the_third_step(tmp_path, monkeypatch):
    """SGD with momentum from the same start: step 1's loss is the shared init's; step 2's follows
    the first update, ``lr * g1`` for any momentum; step 3's follows ``lr * (m g1 + g2)``, where
    0.9 and 0.95 differ."""
    optimizer = torch_side.TorchOptimizer

    def other_momentum(config, *args, **kwargs):
        return optimizer(dataclasses.replace(config, momentum=0.95), *args, **kwargs)

    monkeypatch.setattr(torch_side, "TorchOptimizer", other_momentum)
    result = compare("mlp", ["--steps", "6", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.1"], tmp_path)
    assert result["parted_at_step"] == 3
    assert result["rows"][1]["within"]


def test_bad_input_is_one_error(tmp_path, capsys):
    from jaxllm.command import main

    for argv, message in ((["compare", "transformer"], "unknown job 'transformer' for jaxllm compare"),
                          (["compare", "mlp", "--steps", "0"], "argument --steps: must be >= 1"),
                          (["compare", "lm", "--tokens", str(tmp_path), "--out", str(tmp_path / "x")],
                           "jaxllm compare does not take --tokens"),
                          (["compare", "lm", "--resume", "--out", str(tmp_path / "x")],
                           "jaxllm compare does not take --resume"),
                          (["compare", "classify", "--mode", "full", "--out", str(tmp_path / "x")],
                           "compares --mode lora")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()
