"""Runs training on N forced CPU devices in a fresh process, for tests/test_parallel.py.

``python tests/multidevice.py --devices 4 --out DIR`` sets ``XLA_FLAGS`` before JAX is imported
(a process that imported JAX cannot change its device count) and writes ``DIR/results.npz``
(losses, metrics, params) and ``DIR/results.json`` (messages, shapes). The test process compares
them; nothing here asserts. One process does everything: JAX's start-up and each compilation are
paid once (each train step built here also drives the ``fit()`` runs).

What it runs: 5 steps of GPT-2 (tiny, 1 block, drop_rate 0) and the Burkov decoder (tiny, 1
block) under each strategy in ``RUNS``; for the decoder also eval_step, ``fit()`` with
checkpoints and evaluation, and a ``fit()`` cut at step 2 and resumed; and the errors raised for
a global batch that does not divide by devices x accumulation steps.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import shutil
import sys
import tempfile
import time


def batches(vocab: int, rows: int, context: int, steps: int, seed: int = 0, padded: bool = True):
    """``steps`` LM batches ``{"inputs", "targets"}: int32[rows, context]``. ``padded``: ragged
    padding (targets -100 after a per-row length, one row all padding), so the devices' and
    micro-batches' token counts differ -- a plain mean of their means would be wrong."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, vocab, (rows, context + 1)).astype(np.int32)
        lengths = rng.integers(1, context + 1, rows)
        lengths[rng.integers(rows)] = 0  # one row with nothing to predict
        if not padded:
            lengths[:] = context
        targets = np.where(np.arange(context)[None] < lengths[:, None], ids[:, 1:], -100).astype(np.int32)
        out.append({"inputs": ids[:, :-1], "targets": targets})
    return out


def model_and_loss(name: str, vocab: int = 64, layers: int = 1):
    """(config, loss_fn) for ``gpt2`` (tiny, drop_rate 0 so per-device dropout keys cannot
    matter) or ``decoder`` (transformer.tiny); the loss is the padded token mean."""
    from jaxllm.models import gpt2, transformer
    from jaxllm.training.losses import lm_cross_entropy

    if name == "gpt2":
        config = gpt2.tiny(vocab_size=vocab, context_length=16, emb_dim=32, n_layers=layers, drop_rate=0.0)
        module = config.build()

        def logits(p, tokens, key):  # the dropout path runs (rate 0) so keys flow through every strategy
            return module.apply({"params": p}, tokens, deterministic=key is None,
                                rngs=None if key is None else {"dropout": key})[0]
    else:
        config = transformer.tiny(vocab).replace(num_layers=layers)
        module = config.build()

        def logits(p, tokens, key):
            return module.apply({"params": p}, tokens)[0]

    def loss_fn(params, batch, key):
        return lm_cross_entropy(lambda p, t: logits(p, t, key), pad_id=-100)(params, batch, key)

    return config, loss_fn


def fresh_state(config, seed: int = 0):
    import jax

    from jaxllm.training import OptimizerConfig, TrainState, make_optimizer

    # clipping makes every update depend on the global gradient norm, so it must be right too
    optimizer = make_optimizer(OptimizerConfig("adamw", lr=5e-3, weight_decay=0.1, clip_norm=0.5))
    params = _init_params(config, seed)  # host copies: placing them never aliases (donated) buffers
    return TrainState.create(params, optimizer, jax.random.PRNGKey(seed + 1)), optimizer


@functools.lru_cache(maxsize=None)
def _init_params(config, seed: int):
    import jax
    import numpy as np

    params = config.init(jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(np.asarray, params)


def flat(tree) -> dict:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


# (strategy, accum_steps) per model: every strategy on both models, accumulation on several devices
RUNS = {
    "gpt2": [("single", 1), ("single", 4), ("sharded", 1), ("shard_map", 1), ("pmap", 1)],
    "decoder": [("single", 1), ("single", 4), ("sharded", 1), ("fsdp", 1), ("shard_map", 1), ("pmap", 1),
                ("fsdp", 2), ("shard_map", 2)],  # fsdp/2 runs sharded's code too, with params split
}
UNPADDED = ("single",)  # these also train on batches without padding (same compiled step)
FIT_MODEL = "decoder"  # fit() and resume runs, with the steps built above (no extra compilations)
RESUMED = ("fsdp", "pmap")


class ListBatches:
    """A fixed list of batches with the resumable interface ``fit`` needs."""

    def __init__(self, items):
        self.items, self.index = items, 0
        self.batch_size, self.steps_per_epoch = len(items[0]["inputs"]), len(items)

    def next(self):
        item = self.items[self.index % len(self.items)]
        self.index += 1
        return item

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def run_steps(arrays: dict, info: dict, out_dir: str, steps: int = 5, rows: int = 8) -> None:
    """Manual steps under every strategy; for FIT_MODEL also eval_step, fit() and a resumed fit()."""
    import jax

    from jaxllm.training import FitConfig, fit, make_strategy
    from jaxllm.training.step import evaluate

    for model, runs in RUNS.items():
        config, loss_fn = model_and_loss(model)
        data = batches(config.vocab_size, rows, 16, steps)
        plain_eval = make_strategy("single").eval_step(loss_fn)
        # the wrong rule, for contrast: the mean of 4 micro-batch means (at init, first batch)
        params = fresh_state(config)[0].params
        micro = [jax.tree_util.tree_map(lambda x: x[i::4], data[0]) for i in range(4)]  # any split will do
        arrays[f"{model}/mean_of_micro_means"] = sum(float(plain_eval(params, m)["loss"]) for m in micro) / 4
        arrays[f"{model}/whole_batch_loss"] = float(plain_eval(params, data[0])["loss"])
        for name, accum in runs:
            tag = f"{model}/{name}/{accum}"
            strategy = make_strategy(name)
            state, optimizer = fresh_state(config)
            train_step = strategy.train_step(loss_fn, optimizer, accum_steps=accum)
            state = strategy.place(state)
            losses, norms = [], []
            for batch in data:
                state, metrics = train_step(state, batch)
                losses.append(float(metrics["loss"]))
                norms.append(float(metrics["grad_norm"]))
            arrays[f"{tag}/losses"], arrays[f"{tag}/grad_norms"] = losses, norms
            arrays[f"{tag}/targets"] = float(metrics["targets"])
            info[f"{tag}/metric_shapes"] = [list(getattr(v, "shape", ())) for v in metrics.values()]
            if name in ("sharded", "fsdp"):  # the layout place() chose survives the steps
                leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
                info[f"{tag}/split_leaves"] = [sum(not x.sharding.is_fully_replicated for x in leaves), len(leaves)]
            one = strategy.gather(state)
            info[f"{tag}/gathered_devices"] = sorted({str(d) for x in jax.tree_util.tree_leaves(one)
                                                       for d in x.devices()})
            for key, value in flat(one.params).items():
                arrays[f"{tag}/params{key}"] = value
            start = flat(fresh_state(config)[0].params)
            arrays[f"{tag}/moved"] = max(float(abs(v - start[k]).max()) for k, v in flat(one.params).items())
            if name in UNPADDED:
                other = strategy.place(fresh_state(config)[0])
                for batch in batches(config.vocab_size, rows, 16, steps, padded=False):
                    other, other_metrics = train_step(other, batch)
                    arrays.setdefault(f"{tag}/unpadded/losses", []).append(float(other_metrics["loss"]))
                for key, value in flat(strategy.gather(other).params).items():
                    arrays[f"{tag}/unpadded/params{key}"] = value
            if model != FIT_MODEL or accum != 1:
                continue
            eval_step = plain_eval if name == "single" else strategy.eval_step(loss_fn)
            for key, value in eval_step(state.params, data[0]).items():
                arrays[f"{tag}/eval/{key}"] = float(value)

            def eval_fn(params):  # a plain one-device eval: fit must hand it gathered params
                return evaluate(plain_eval, params, data[:1])

            run = os.path.join(out_dir, name)
            fresh, _ = fresh_state(config)
            final = fit(fresh, train_step, ListBatches(data), FitConfig(out_dir=run, steps=steps, eval_every=2,
                        checkpoint_every=2, progress=False), eval_fn=eval_fn, strategy=strategy)
            for key, value in flat(final.params).items():
                arrays[f"fit/{name}/params{key}"] = value
            with open(os.path.join(run, "metrics.jsonl")) as f:
                rows_logged = [json.loads(line) for line in f]
            arrays[f"fit/{name}/losses"] = [r["loss"] for r in rows_logged if r["split"] == "train"]
            arrays[f"fit/{name}/eval_steps"] = [r["step"] for r in rows_logged if r["split"] == "eval"]
            if name in RESUMED:  # cut at step 2, resumed to the end: checkpoints hold a gathered state
                run = os.path.join(out_dir, f"resume_{name}")
                fit(fresh_state(config)[0], train_step, ListBatches(data), FitConfig(out_dir=run, steps=2,
                    progress=False))  # the strategy comes from the step itself
                final = fit(fresh_state(config)[0], train_step, ListBatches(data), FitConfig(out_dir=run,
                            steps=steps, progress=False, resume=True))
                for key, value in flat(final.params).items():
                    arrays[f"resume/{name}/params{key}"] = value
            info[f"{tag}/compilations"] = train_step._cache_size()


def run_errors(info: dict) -> None:
    from jaxllm.training import make_strategy

    config, loss_fn = model_and_loss("decoder")
    batch = batches(config.vocab_size, 6, 16, 1)[0]
    for name, accum in (("sharded", 1), ("pmap", 1), ("shard_map", 2), ("fsdp", 1), ("single", 4)):
        strategy = make_strategy(name)
        state, optimizer = fresh_state(config)
        step = strategy.train_step(loss_fn, optimizer, accum_steps=accum)
        try:
            step(strategy.place(state), batch)
            info[f"error/{name}/{accum}"] = None
        except ValueError as exc:
            info[f"error/{name}/{accum}"] = str(exc)
    info["auto"] = make_strategy().name
    info["num_devices"] = make_strategy().num_devices


LM_FLAGS = ["--model", "decoder", "--preset", "tiny", "--layers", "1", "--vocab-size", "300", "--context", "16",
            "--batch-size", "8", "--d-model", "16", "--heads", "2", "--warmup-steps", "2", "--lr", "3e-3",
            "--sample-tokens", "5", "--eval-batch-size", "8", "--no-progress", "--steps", "4", "--eval-every", "2"]
LM_RUNS = {"single": ["--parallel", "single"], "pmap_accum2": ["--parallel", "pmap", "--accum-steps", "2"]}


def run_lm_script(info: dict, out_dir: str) -> None:
    """``jaxllm train lm`` end to end (checkpoints, evaluation, sampling) on one device and under pmap
    with accumulation: the summaries must agree."""
    from corpus import english
    from jaxllm.jobs import lm

    corpus = os.path.join(out_dir, "corpus.txt")
    os.makedirs(out_dir, exist_ok=True)
    with open(corpus, "w") as dst:
        dst.write(english(36_000))
    for name, flags in LM_RUNS.items():
        summary = lm.main(["--text", corpus, "--out", os.path.join(out_dir, name), *LM_FLAGS, *flags])
        info[f"lm/{name}"] = {k: summary[k] for k in ("val_loss", "status", "steps", "last_checkpoint")}


@functools.lru_cache(maxsize=None)
def results(devices: int = 4) -> tuple[dict, dict]:
    """Run this file in a subprocess with ``devices`` forced CPU devices and return ``(arrays,
    info)``: the npz as a dict of numpy arrays, and the JSON. Once per test session: with
    ``JAXLLM_TEST_SESSION_DIR`` set (tests/conftest.py), the first pytest-xdist worker to ask runs
    it under a file lock and the others read its results."""
    import fcntl

    import numpy as np

    shared = os.environ.get("JAXLLM_TEST_SESSION_DIR")
    if shared:
        out = os.path.join(shared, f"multidevice-{devices}")
    else:
        out = tempfile.mkdtemp(prefix="jaxllm_multidevice_")
        atexit.register(shutil.rmtree, out, True)
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(out, "results.json")):
            shutil.rmtree(out, ignore_errors=True)
            import processes

            processes.finish([processes.start([os.path.abspath(__file__), "--devices", str(devices), "--out", out])],
                             timeout_s=1800)
    with np.load(os.path.join(out, "results.npz")) as npz:
        arrays = {k: npz[k] for k in npz.files}
    with open(os.path.join(out, "results.json")) as f:
        return arrays, json.load(f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    # optimization level 0: compiles ~3x faster; every run here shares the compiler, and the
    # tests compare numbers, not speed
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
                               f"{args.devices} --xla_backend_optimization_level=0").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np

    os.makedirs(args.out, exist_ok=True)
    arrays, info = {}, {}
    cpu = {"start": time.process_time()}  # where the time goes, for whoever has to shrink it
    run_errors(info)
    cpu["errors"] = time.process_time()
    run_steps(arrays, info, os.path.join(args.out, "runs"))
    cpu["steps"] = time.process_time()
    run_lm_script(info, os.path.join(args.out, "lm"))
    cpu["lm_script"] = time.process_time()
    info["cpu_seconds"] = {k: round(v, 1) for k, v in cpu.items()}
    np.savez(os.path.join(args.out, "results.npz"), **{k: np.asarray(v) for k, v in arrays.items()})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
