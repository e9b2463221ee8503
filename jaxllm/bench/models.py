"""The benchmarked models: each family at a tiny and a small size, with its PyTorch twin.

A ``Case`` bundles a Flax config, a seeded twin, one fixed batch and the loss both frameworks
minimise. The twin is built first (``torch.manual_seed``) and the Flax params are copied from
its state dict through ``jaxllm.interop``, so both sides start from the same weights and the
first losses agree (the suites check that).

Transformer sizes: config A (vocab 512, d_model 128, 4 layers, context 128) and
config B (vocab 8192, d_model 384, 6 layers, context 256), 2,048 tokens per step. The
specified prototype was a RoPE decoder with RMSNorm and a SiLU MLP; the twin that exists for that layout
is Burkov's decoder (interleaved RoPE, RMSNorm, per-head Q/K/V, ReLU MLP), so the ``decoder``
rows use it. ``gpt2`` rows are Raschka's GPT-2 (LayerNorm, learned positions, GELU) at the same
sizes with dropout 0 (dropout draws differ between frameworks; its cost is not the question).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

FAMILIES = ("linear", "mlp", "cnn", "rnn", "decoder", "gpt2")
SIZES = ("tiny", "small")


@dataclasses.dataclass
class Case:
    """One family at one size. ``batch`` uses the JAX loss's keys (``inputs``/``targets`` for
    language models, ``x``/``y`` otherwise); ``units`` per step are tokens or examples."""

    family: str
    size: str
    label: str
    config: Any
    make_twin: Callable[[], Any]
    loss: str  # "lm" | "softmax" | "mse"
    batch: dict[str, np.ndarray]
    units: int
    unit: str

    @property
    def name(self) -> str:
        return f"{self.family}/{self.size}"


def lm_batch(rng, vocab: int, rows: int, context: int) -> dict[str, np.ndarray]:
    seqs = rng.integers(0, vocab, (rows, context + 1)).astype(np.int32)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}


# configs A and B of the two transformer families: (config, rows, context)
TRANSFORMER_CONFIGS = {
    "decoder": {"A": lambda: (_decoder(512, d_model=128, num_heads=8, num_layers=4, max_len=512), 16, 128),
                "B": lambda: (_decoder(8192, d_model=384, num_heads=6, num_layers=6, max_len=512), 8, 256)},
    "gpt2": {"A": lambda: (_gpt2(vocab_size=512, context_length=512, emb_dim=128, n_heads=8, n_layers=4,
                                 drop_rate=0.0), 16, 128),
             "B": lambda: (_gpt2(vocab_size=8192, context_length=512, emb_dim=384, n_heads=6, n_layers=6,
                                 drop_rate=0.0), 8, 256)},
}
TRANSFORMER_LABELS = {"decoder": "Burkov decoder", "gpt2": "GPT-2"}


def _decoder(*args, **kwargs):
    from jaxllm.models.transformer import TransformerConfig

    return TransformerConfig(*args, **kwargs)


def _gpt2(**kwargs):
    from jaxllm.models.gpt2 import GPT2Config

    return GPT2Config(**kwargs)


def config_a(family: str):
    """Config A for ``decoder`` or ``gpt2``: (config, rows, context)."""
    return TRANSFORMER_CONFIGS[family]["A"]()


def config_b(family: str):
    """Config B for ``decoder`` or ``gpt2``: (config, rows, context)."""
    return TRANSFORMER_CONFIGS[family]["B"]()


def make_case(family: str, size: str, seed: int = 0) -> Case:
    """The benchmark case ``family`` at ``size`` ("tiny" or "small"; "A"/"B" also name the
    transformer sizes)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    size = {"A": "tiny", "B": "small"}.get(size, size)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES} (or A/B for decoder/gpt2), got {size!r}")
    rng = np.random.default_rng(seed)
    small = size == "small"
    return _BUILDERS[family](rng, small)


def _linear(rng, small):
    from jaxllm.models import linear
    from jaxllm.torch_ref import linear as t_linear

    n_in, n_out, rows = (512, 64, 1024) if small else (4, 1, 64)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    y = rng.standard_normal((rows, n_out)).astype(np.float32)
    return Case("linear", "small" if small else "tiny", f"linear regression {n_in}->{n_out}, batch {rows}",
                linear.LinearConfig(n_in, n_out), lambda: t_linear.linear_regression(n_in, n_out), "mse",
                {"x": x, "y": y}, rows, "examples")


def _mlp(rng, small):
    from jaxllm.models import mlp
    from jaxllm.torch_ref import mlp as t_mlp

    if small:
        config, rows = mlp.MLPConfig(784, 10, (256, 128), "relu"), 256
    else:
        config, rows = mlp.raschka_appendix_a(2, 2), 32
    x = rng.standard_normal((rows, config.num_inputs)).astype(np.float32)
    y = rng.integers(0, config.num_outputs, rows).astype(np.int32)
    return Case("mlp", "small" if small else "tiny",
                f"MLP {config.num_inputs}-{'-'.join(map(str, config.hidden))}-{config.num_outputs}, batch {rows}",
                config, lambda: t_mlp.from_config(config), "softmax", {"x": x, "y": y}, rows, "examples")


def _cnn(rng, small):
    from jaxllm.models import cnn
    from jaxllm.torch_ref import cnn as t_cnn

    config = cnn.mnist() if small else cnn.digits8x8()
    rows = 64
    x = rng.random((rows, config.image_size, config.image_size)).astype(np.float32)
    y = rng.integers(0, config.num_classes, rows).astype(np.int32)
    return Case("cnn", "small" if small else "tiny",
                f"CNN {config.image_size}x{config.image_size}, channels {config.channels}, batch {rows}",
                config, lambda: t_cnn.from_config(config), "softmax", {"x": x, "y": y}, rows, "examples")


def _rnn(rng, small):
    from jaxllm.models import rnn
    from jaxllm.torch_ref import rnn as t_rnn

    if small:
        config, rows, context = rnn.burkov(512), 16, 128
    else:
        config, rows, context = rnn.RNNConfig(64, emb_dim=16, num_layers=2), 8, 32
    return Case("rnn", "small" if small else "tiny",
                f"Elman RNN emb {config.emb_dim}, {config.num_layers} layers, {rows}x{context} tokens",
                config, lambda: t_rnn.from_config(config), "lm", lm_batch(rng, config.vocab_size, rows, context),
                rows * context, "tokens")


def _transformer(family):
    def build(rng, small):
        config, rows, context = (config_b if small else config_a)(family)
        label = (f"{TRANSFORMER_LABELS[family]} config {'B' if small else 'A'}: vocab {config.vocab_size}, "
                 f"d {config.width}, {config.num_blocks} layers, {config.num_attention_heads} heads, "
                 f"{rows}x{context} tokens")
        return Case(family, "small" if small else "tiny", label, config, lambda: twin_of(config), "lm",
                    lm_batch(rng, config.vocab_size, rows, context), rows * context, "tokens")

    return build


def twin_of(config):
    from jaxllm.torch_ref import twin_of as torch_twin

    return torch_twin(config)


_BUILDERS = {"linear": _linear, "mlp": _mlp, "cnn": _cnn, "rnn": _rnn,
             "decoder": _transformer("decoder"), "gpt2": _transformer("gpt2")}


# -- both frameworks' pieces of a case -----------------------------------------------------------

def twin_and_params(case: Case, seed: int = 0):
    """The seeded twin (train mode) and the Flax params copied from it (its parameters, not its
    buffers such as GPT-2's causal masks)."""
    import torch

    from jaxllm import interop

    torch.manual_seed(seed)
    twin = case.make_twin()
    return twin, interop.from_torch(case.config, dict(twin.named_parameters()))


def jax_loss_fn(case: Case):
    """``loss_fn(params, batch, key) -> (loss, aux)`` for the case's model."""
    from jaxllm.training.losses import LOSSES, lm_loss

    if case.loss == "lm":
        return lm_loss(case.config)
    return LOSSES[case.loss](case.config.apply)


def jax_training(case: Case):
    """``(one_step, compiled_hlo)`` for the case in JAX from its own fresh init: ``one_step()`` runs
    one jitted AdamW step (lr 1e-3, weight decay 0.01), carrying the state to the next call, and
    waits for its loss; ``compiled_hlo()`` is that step's optimised HLO text."""
    import jax

    from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step

    optimizer = make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01))
    box = {"state": TrainState.create(case.config.init(jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(0))}
    step = make_train_step(jax_loss_fn(case), optimizer)
    batch = jax.device_put(case.batch)

    def one_step():
        box["state"], metrics = step(box["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return one_step, lambda: step.lower(box["state"], batch).compile().as_text()


def torch_loss_fn(case: Case):
    """``loss(twin, batch_tensors) -> scalar tensor``, the same loss as ``jax_loss_fn``."""
    import torch
    import torch.nn.functional as F

    if case.loss == "lm":
        def loss(twin, b):
            out = twin(b["inputs"])
            logits = out[0] if isinstance(out, tuple) else out  # the RNN twin also returns its hidden state
            return F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten())
    elif case.loss == "softmax":
        def loss(twin, b):
            return F.cross_entropy(twin(b["x"]), b["y"])
    else:
        def loss(twin, b):
            return F.mse_loss(twin(b["x"]), b["y"])
    del torch
    return loss


def torch_batch(case: Case):
    """The case's batch as torch tensors (int64 ids and labels, as torch's losses expect)."""
    import torch

    out = {}
    for k, v in case.batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.long() if v.dtype.kind in "iu" else t
    return out


def param_count(params) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
