"""Mixed precision: bf16 compute, fp32 master weights and optimiser state, fp32's loss within 2 %."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.models import gpt2, transformer
from jaxllm.training import TrainState, make_train_step
from jaxllm.training.losses import lm_loss
from jaxllm.training.precision import cast_floats, compute_dtype, mixed_precision

VOCAB = 61
CONFIGS = {
    "gpt2": gpt2.tiny(vocab_size=VOCAB, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0),
    "decoder": transformer.tiny(VOCAB),
}


def pattern_batches(steps: int, rows: int = 8, time: int = 16):
    """Learnable sequences (each row counts up by a row-specific stride mod VOCAB), so the loss falls."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        start = rng.integers(0, VOCAB, (rows, 1))
        stride = rng.integers(1, 4, (rows, 1))
        ids = ((start + stride * np.arange(time + 1)) % VOCAB).astype(np.int32)
        out.append({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
    return out


def train(config, dtype, batches):
    optimizer = optax.adamw(1e-2, weight_decay=0.01)
    params = config.init(jax.random.PRNGKey(0))
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(1))
    step = make_train_step(mixed_precision(lm_loss(config), dtype), optimizer)
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(metrics["loss"])
    return state, [float(x) for x in losses], metrics


def test_bf16_training_tracks_fp32():
    """20 AdamW steps of the decoder from the same init on the same batches (GPT-2's bf16 compute
    is checked by the matmul test below)."""
    batches = pattern_batches(20)
    state32, losses32, _ = train(CONFIGS["decoder"], "float32", batches)
    state16, losses16, metrics16 = train(CONFIGS["decoder"], "bfloat16", batches)
    assert losses32[-1] < 0.7 * losses32[0]  # it learns, so "within 2 %" compares trained models
    assert losses16[-1] == pytest.approx(losses32[-1], rel=0.02)
    assert losses16 != losses32  # bf16 really ran (rounding differs)
    for leaf in jax.tree_util.tree_leaves((state16.params, state16.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32  # master weights and Adam moments
    assert all(v.dtype == jnp.float32 for v in metrics16.values())


def dot_dtypes(config, dtype):
    """Operand dtypes of every matmul in the traced gradient of the wrapped loss."""
    params = config.init(jax.random.PRNGKey(0))
    b = pattern_batches(1, rows=2, time=8)[0]
    loss_fn = mixed_precision(lm_loss(config), dtype)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, b, None)[0]))(params)
    found = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for p in eqn.params.values():  # remat, pjit, custom_jvp ... hold inner jaxprs
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("name", CONFIGS)
def test_every_matmul_runs_in_bf16(name):
    found = dot_dtypes(CONFIGS[name], "bfloat16")
    assert found, "no matmul found in the jaxpr"
    mixed = [d for d in found if d != ("bfloat16", "bfloat16")]
    assert not mixed, f"{len(mixed)} of {len(found)} matmuls are not bf16 x bf16: {mixed[:4]}"


def test_float32_is_the_identity_and_bad_dtypes_are_refused():
    fn = lm_loss(CONFIGS["decoder"])
    assert mixed_precision(fn, "float32") is fn
    assert compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        mixed_precision(fn, "float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        compute_dtype(jnp.int32)


def test_cast_floats_leaves_integers_alone():
    tree = {"w": jnp.ones(3), "ids": jnp.arange(3), "mask": np.ones(2, bool)}
    out = cast_floats(tree, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["ids"].dtype == tree["ids"].dtype
    assert out["mask"].dtype == bool


def test_targets_and_counts_stay_exact_in_bf16():
    """Logits leave the model in float32, so the target count (it weighs device and micro-batch
    means) is exact even where bf16 could not hold it (2047 rounds to 2048 in bf16)."""
    config = CONFIGS["decoder"]
    params = config.init(jax.random.PRNGKey(0))
    ids = np.ones((1, 2048), np.int32)
    ids[0, 0] = 0
    batch = {"inputs": ids, "targets": ids}
    from jaxllm.training.losses import lm_cross_entropy

    logits = lambda p, t: config.build().apply({"params": p}, t)[0]
    loss_fn = mixed_precision(lm_cross_entropy(logits, pad_id=0), "bfloat16")
    _, aux = jax.jit(loss_fn)(params, batch, None)
    assert float(aux["targets"]) == 2047.0
