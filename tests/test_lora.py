"""LoRA (Raschka app. E, PEFT preset): parity with the book's LinearWithLoRA twin (logits, A/B
gradients, a 10-step AdamW trajectory with only the adapters trained), the book's 2,666,528
trainable parameters for GPT-2 124M with a 2-class head, no optimiser state for frozen weights,
merge / unmerge, adapter-only files, the PEFT preset's targets and init, the Burkov decoder's
raw-weight adapters against an explicit numpy merge, and bad input."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import save_file

import jaxllm.models.gpt2 as g
import jaxllm.models.transformer as tr
from jaxllm import interop
from jaxllm.nn import lora
from jaxllm.torch_ref import gpt2 as t_gpt2
from jaxllm.torch_ref import lora as t_lora
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.freeze import count_params, lora_optimizer, stop_frozen_gradients
from parity import GRAD, OUTPUT, TRAJECTORY, assert_close, run_both_trajectories

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

CONFIG = g.tiny(num_classes=2, qkv_bias=True, vocab_size=97, context_length=16, drop_rate=0.0)
RANK, ALPHA = 4, 8.0  # scale 2: a wrong scale cannot hide behind alpha / r = 1
LORA = lora.raschka(RANK, ALPHA)
DENSE_MODULES = 2 * 6 + 1  # per block W_query, W_key, W_value, out_proj, ff.layers_0, ff.layers_2; the head


def twin_with_lora(seed=0):
    """The book's recipe: GPT model, new 2-class head, freeze everything, wrap every Linear.
    B is drawn nonzero (B = 0 would make the LoRA term vanish)."""
    torch.manual_seed(seed)
    twin = t_gpt2.GPTModel(CONFIG.to_twin_dict())
    twin.out_head = torch.nn.Linear(CONFIG.emb_dim, CONFIG.num_classes)
    for p in twin.parameters():
        p.requires_grad = False
    t_lora.replace_linear_with_lora(twin, RANK, ALPHA)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, t_lora.LoRALayer):
                module.B.normal_(0.0, 0.2)
    return twin.eval(), t_lora.lora_from_torch(CONFIG, t_gpt2.drop_masks(twin.state_dict()))


def base_logits_fn(config=CONFIG):
    model = config.build()
    return lambda params, tokens: model.apply({"params": params}, tokens)[0]


LORA_LOGITS_EAGER = lora.apply_with_lora(base_logits_fn(), LORA)
LORA_LOGITS = jax.jit(LORA_LOGITS_EAGER)


def class_loss(logits_fn):
    """Cross-entropy on the last position's class logits (Raschka ch. 6)."""
    def loss_fn(params, batch, key):
        logits = logits_fn(params, batch["inputs"])[:, -1, :]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss, {}

    return loss_fn


def torch_class_loss(twin, batch):
    logits = twin(torch.from_numpy(batch["inputs"]).long())[:, -1, :]
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]).long())


def make_batch(rng, batch=4, time=12):
    return {"inputs": rng.integers(0, CONFIG.vocab_size, (batch, time)).astype(np.int32),
            "labels": rng.integers(0, 2, (batch,)).astype(np.int32)}


def numpy_tree(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


# ------------------------------------------------------------------ parity with the twin

def test_twin_names_and_roundtrip():
    twin, params = twin_with_lora()
    sd = t_gpt2.drop_masks(twin.state_dict())
    assert {"trf_blocks.1.ff.layers.2.linear.weight", "trf_blocks.1.ff.layers.2.lora.A",
            "out_head.linear.bias", "out_head.lora.B"} <= set(sd)
    block = params["trf_blocks_0"]["att"]["W_query"]
    assert set(block) == {"kernel", "bias", "lora_A", "lora_B"}
    np.testing.assert_array_equal(block["lora_A"], sd["trf_blocks.0.att.W_query.lora.A"].numpy())  # no transpose
    np.testing.assert_array_equal(block["kernel"], sd["trf_blocks.0.att.W_query.linear.weight"].numpy().T)
    assert len(lora.lora_state(params)) == 2 * DENSE_MODULES
    trainable = sum(p.numel() for p in twin.parameters() if p.requires_grad)
    assert count_params(params, lora.lora_mask(params)) == trainable
    back = t_lora.lora_to_torch(CONFIG, params)
    assert set(back) == set(sd)
    for name, value in sd.items():
        torch.testing.assert_close(back[name], value, rtol=0, atol=0)


def test_logits_match_twin():
    twin, params = twin_with_lora(1)
    x = make_batch(np.random.default_rng(1), time=16)["inputs"]
    with torch.no_grad():
        expected = twin(torch.from_numpy(x).long()).numpy()
    got = np.asarray(LORA_LOGITS(params, jnp.asarray(x)))
    assert got.shape == (4, 16, 2)
    assert_close(got, expected, OUTPUT, err_msg="lora logits (jitted)")
    assert_close(LORA_LOGITS_EAGER(params, jnp.asarray(x)), expected, OUTPUT, err_msg="lora logits (eager)")
    # the adapters matter: the base model alone is far off
    base = np.asarray(base_logits_fn()(lora.without_lora(params), jnp.asarray(x)))
    assert np.abs(base - expected).max() > 1e-2


def test_lora_gradients_match_twin():
    twin, params = twin_with_lora(2)
    batch = make_batch(np.random.default_rng(2))
    (loss, _), grads = jax.jit(jax.value_and_grad(class_loss(LORA_LOGITS), has_aux=True))(params, batch, None)
    t_loss = torch_class_loss(twin, batch)
    t_loss.backward()
    assert_close(float(loss), t_loss.item(), OUTPUT, err_msg="lora loss")
    expected = {n: p.grad.numpy() for n, p in twin.named_parameters() if p.requires_grad}
    assert len(expected) == 2 * DENSE_MODULES and all(".lora." in n for n in expected)
    got = t_lora.lora_to_torch(CONFIG, grads)
    for name, value in expected.items():
        assert np.abs(value).max() > 0, name
        assert_close(got[name].numpy(), value, GRAD, err_msg=name)


def test_ten_step_adamw_trajectory_trains_only_lora():
    twin, params = twin_with_lora(3)
    rng = np.random.default_rng(3)
    batches = [make_batch(rng) for _ in range(10)]
    start_jax = numpy_tree(params)
    start_torch = {k: v.clone() for k, v in t_gpt2.drop_masks(twin.state_dict()).items()}

    optimizer = lora_optimizer(make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1)), params)
    loss_fn = stop_frozen_gradients(class_loss(LORA_LOGITS), lora.lora_mask(params))
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.1)
    state, jax_losses, torch_losses = run_both_trajectories(make_train_step(loss_fn, optimizer), state, twin,
                                                            torch_opt, torch_class_loss, batches)

    assert_close(jax_losses, torch_losses, TRAJECTORY, err_msg="lora losses over 10 AdamW steps")
    final = t_lora.lora_to_torch(CONFIG, state.params)
    for name, value in twin.state_dict().items():
        if name.endswith(t_gpt2.MASK_SUFFIX):
            continue
        if ".lora." in name:  # trained, in step
            assert not torch.equal(value, start_torch[name]), name
            assert_close(final[name].numpy(), value.numpy(), TRAJECTORY, err_msg=name)
        else:  # frozen: bit-for-bit unchanged in both frameworks
            assert torch.equal(value, start_torch[name]), name
    base_now, base_start = lora.without_lora(state.params), lora.without_lora(start_jax)
    jax.tree_util.tree_map(np.testing.assert_array_equal, base_now, base_start)


# ------------------------------------------------------------------ the book's count, optimiser state

def test_gpt2_124m_classifier_count_and_optimizer_state():
    config = g.gpt2_124m(qkv_bias=True, num_classes=2)
    base = interop.param_shapes(config)  # shapes only: nothing allocated
    with_lora = jax.eval_shape(lambda p: lora.add_lora(p, lora.raschka(16, 16.0), jax.random.PRNGKey(0)), base)
    # 124,412,160 (book, tied/no head) + Q/K/V biases 12 * 3 * 768 + head 768 * 2 + 2
    assert count_params(base) == 124_412_160 + 27_648 + 1_538
    trainable = count_params(with_lora, lora.lora_mask(with_lora))
    assert trainable == 2_666_528  # the book's figure (app. E)
    assert count_params(with_lora) == count_params(base) + trainable

    optimizer = lora_optimizer(optax.adamw(8e-4, weight_decay=0.1), with_lora)
    opt_state = jax.eval_shape(optimizer.init, with_lora)
    leaves = jax.tree_util.tree_leaves(opt_state)
    arrays = [leaf for leaf in leaves if leaf.ndim > 0]
    assert sum(int(np.prod(leaf.shape)) for leaf in arrays) == 2 * trainable  # Adam's mu and nu, LoRA only
    lora_shapes = {v.shape for v in lora.lora_state(with_lora).values()}
    assert {leaf.shape for leaf in arrays} <= lora_shapes
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) < 2 * trainable + 10  # plus step counters


# ------------------------------------------------------------------ merge, unmerge, files

def test_merge_and_unmerge():
    _, params = twin_with_lora(4)
    x = jnp.asarray(make_batch(np.random.default_rng(4), time=16)["inputs"])
    merged = lora.merge(params, LORA)
    assert lora.lora_state(merged) == {}
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(lora.without_lora(params))
    assert_close(base_logits_fn()(merged, x), LORA_LOGITS(params, x), OUTPUT, err_msg="merged vs adapter logits")
    w = params["trf_blocks_1"]["ff"]["layers_0"]
    # merge and unmerge are one matmul of K=r and one add: bit-identical / 1 ulp here, so tighter than OUTPUT
    np.testing.assert_allclose(merged["trf_blocks_1"]["ff"]["layers_0"]["kernel"],
                               np.asarray(w["kernel"]) + 2.0 * np.asarray(w["lora_A"]) @ np.asarray(w["lora_B"]),
                               rtol=1e-6, atol=1e-6)
    restored = lora.unmerge(merged, lora.lora_state(params), LORA)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), restored, params)


def test_save_and_load_adapters(tmp_path):
    twin, params = twin_with_lora(5)
    x = jnp.asarray(make_batch(np.random.default_rng(5), time=16)["inputs"])
    path = tmp_path / "adapter.safetensors"
    lora.save_lora(path, params, LORA)
    lora_bytes = sum(np.asarray(v).nbytes for v in lora.lora_state(params).values())
    full_bytes = sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(params))
    size = path.stat().st_size
    assert lora_bytes <= size < lora_bytes + 8192 and size < full_bytes / 5

    fresh_base = interop.from_torch(CONFIG, {k.replace(".linear.", "."): v for k, v in
                                             t_gpt2.drop_masks(twin.state_dict()).items() if ".lora." not in k})
    loaded, cfg = lora.load_lora(path, fresh_base)
    assert cfg == LORA
    np.testing.assert_array_equal(np.asarray(LORA_LOGITS(loaded, x)), np.asarray(LORA_LOGITS(params, x)))

    shallower = interop.param_shapes(CONFIG.replace(n_layers=1))
    with pytest.raises(ValueError, match="trf_blocks_1/.*no weight trf_blocks_1/"):
        lora.load_lora(path, shallower)
    narrower = interop.param_shapes(CONFIG.replace(emb_dim=32))
    with pytest.raises(ValueError, match=r"LoRA adapter .*lora_A/lora_B of shapes \(64, 4\)"):
        lora.load_lora(path, narrower)
    with pytest.raises(ValueError, match="already hold LoRA"):
        lora.load_lora(path, params)
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA file"):
        lora.load_lora(tmp_path / "other.safetensors", fresh_base)


# ------------------------------------------------------------------ presets

def init_base(config=CONFIG, seed=0):
    """Random base params of the model's shapes (numpy draws: no init to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                                  interop.param_shapes(config))


def test_peft_preset_targets_and_init():
    base = init_base()
    cfg = lora.peft(("att/W_query", "att/W_value"))
    assert (cfg.rank, cfg.alpha, cfg.scale) == (16, 32.0, 2.0)  # Burkov ch. 5
    params = lora.add_lora(base, cfg, jax.random.PRNGKey(1))
    state = lora.lora_state(params)
    assert set(state) == {f"trf_blocks_{i}/att/{m}/lora_{ab}" for i in range(2) for m in ("W_query", "W_value")
                          for ab in "AB"}
    bound = 1 / np.sqrt(CONFIG.emb_dim)  # PEFT: 1/sqrt(in)
    a = np.asarray(state["trf_blocks_0/att/W_query/lora_A"])
    assert a.shape == (64, 16) and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert np.all(np.asarray(state["trf_blocks_1/att/W_value/lora_B"]) == 0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, lora.without_lora(params), base)


def test_raschka_preset_targets_every_dense_and_starts_at_the_base():
    base = init_base()
    params = lora.add_lora(base, lora.raschka(), jax.random.PRNGKey(2))
    state = lora.lora_state(params)
    assert len(state) == 2 * DENSE_MODULES and "out_head/lora_A" in state
    assert not any("emb" in name for name in state)
    assert state["out_head/lora_B"].shape == (16, 2) and state["trf_blocks_0/ff/layers_0/lora_A"].shape == (64, 16)
    for name, value in state.items():
        value = np.asarray(value)
        if name.endswith("lora_A"):
            assert np.abs(value).max() <= 0.25 and np.abs(value).max() > 0.2, name  # U(+-1/sqrt(r)), r = 16
        else:
            assert np.all(value == 0), name
    a0, a1 = state["trf_blocks_0/att/W_query/lora_A"], state["trf_blocks_0/att/W_key/lora_A"]
    assert not np.allclose(a0, a1)  # independent keys per adapter
    x = jnp.asarray(make_batch(np.random.default_rng(6))["inputs"])
    np.testing.assert_array_equal(np.asarray(lora.apply_with_lora(base_logits_fn(), lora.raschka())(params, x)),
                                  np.asarray(base_logits_fn()(base, x)))


def test_config_roundtrip():
    cfg = lora.peft(["att/W_query"], rank=8, alpha=16)
    assert cfg.targets == ("att/W_query",)
    assert lora.LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------ Burkov decoder: raw weights

DECODER = tr.tiny(50)


def decoder_logits(params, tokens):
    return DECODER.build().apply({"params": params}, tokens)[0]


def numpy_merge(params, scale):
    """W + scale * A @ B for every ``<name>_lora_A``, by hand in numpy."""
    flat = {"/".join(k.key for k in path): np.asarray(v, np.float64)
            for path, v in jax.tree_util.tree_leaves_with_path(params)}
    out = {}
    for name, value in flat.items():
        if name.endswith(("_lora_A", "_lora_B")):
            continue
        if f"{name}_lora_A" in flat:
            value = value + scale * flat[f"{name}_lora_A"] @ flat[f"{name}_lora_B"]
        out[name] = value.astype(np.float32)
    return out


def unflatten(flat):
    tree = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


def test_decoder_raw_weight_adapters():
    base = init_base(DECODER)
    cfg = lora.raschka(4, 8.0)
    params = lora.add_lora(base, cfg, jax.random.PRNGKey(3))
    state = lora.lora_state(params)
    weights = {n[: -len("_lora_A")] for n in state if n.endswith("_lora_A")}
    assert weights == ({f"layers_{i}/attn/heads_{h}/{w}" for i in range(2) for h in range(2)
                        for w in ("W_Q", "W_K", "W_V")}
                       | {f"layers_{i}/{m}" for i in range(2) for m in ("attn/W_O", "mlp/W_1", "mlp/W_2")}
                       | {"output"})
    x = jnp.asarray(np.random.default_rng(7).integers(0, 50, (2, 10)).astype(np.int32))
    with_lora = jax.jit(lora.apply_with_lora(decoder_logits, cfg))
    base_logits = jax.jit(decoder_logits)
    np.testing.assert_array_equal(np.asarray(with_lora(params, x)), np.asarray(base_logits(base, x)))

    rng = np.random.default_rng(8)
    params = lora.attach_lora(base, {n: (rng.normal(0, 0.1, v.shape).astype(np.float32) if n.endswith("_lora_B")
                                         else v) for n, v in state.items()})  # B != 0
    reference = numpy_merge(params, cfg.scale)
    expected = np.asarray(base_logits(unflatten(reference), x))
    assert np.abs(expected - np.asarray(base_logits(base, x))).max() > 1e-2
    assert_close(with_lora(params, x), expected, OUTPUT, err_msg="adapters vs numpy-merged weights")
    merged = lora.merge(params, cfg)
    for name, value in reference.items():  # one matmul of K=r and one add: tighter than OUTPUT
        np.testing.assert_allclose(np.asarray(merged_leaf(merged, name)), value, rtol=1e-6, atol=1e-6, err_msg=name)

    # Gradients: dA = scale * dW B^T and dB = scale * A^T dW, with dW the base model's gradient at
    # the merged weights; with the frozen leaves stopped only LoRA leaves get any gradient.
    probe = jnp.asarray(rng.normal(size=(2, 10, 50)), jnp.float32)

    def loss_fn(p, batch, key):
        return jnp.sum(with_lora(p, batch) * probe), {}

    grads = jax.jit(jax.grad(lambda p: stop_frozen_gradients(loss_fn, lora.lora_mask(p))(p, x, None)[0]))(params)
    d_merged = jax.jit(jax.grad(lambda p: jnp.sum(decoder_logits(p, x) * probe)))(unflatten(reference))
    for name in sorted(weights):
        dw = np.asarray(merged_leaf(d_merged, name), np.float64)
        a = np.asarray(merged_leaf(params, name + "_lora_A"), np.float64)
        b = np.asarray(merged_leaf(params, name + "_lora_B"), np.float64)
        assert_close(merged_leaf(grads, name + "_lora_A"), cfg.scale * dw @ b.T, GRAD, err_msg=f"{name} dA")
        assert_close(merged_leaf(grads, name + "_lora_B"), cfg.scale * a.T @ dw, GRAD, err_msg=f"{name} dB")
        assert float(jnp.abs(merged_leaf(grads, name)).max()) == 0.0
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree_util.tree_leaves(lora.without_lora(grads)))

    # and the LoRA optimiser moves only LoRA leaves, whatever gradient the base weights get
    optimizer = lora_optimizer(optax.adamw(1e-2, weight_decay=0.1), params)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    after = optax.apply_updates(params, optimizer.update(ones, optimizer.init(params), params)[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, lora.without_lora(after), base)
    for name, value in lora.lora_state(after).items():
        assert not np.array_equal(np.asarray(value), np.asarray(lora.lora_state(params)[name])), name


def merged_leaf(tree, name):
    node = tree
    for part in name.split("/"):
        node = node[part]
    return node


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": 2.5}, "rank must be an integer"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"init": "xavier"}, "init must be one of"),
    ({"targets": "att"}, "sequence of regexes"),
    ({"targets": ("att(",)}, "not a valid regex"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        lora.LoRAConfig(**kwargs)


class General(nn.Module):  # a 2-D kernel that is not an nn.Dense
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="dense")(nn.DenseGeneral(4, name="general")(x))


def test_bad_use():
    base = interop.param_shapes(CONFIG)  # shapes suffice: these fail before touching values
    with pytest.raises(ValueError, match=r"pattern 'att/W_nothing' matches no weight matrix; weights look like"):
        lora.add_lora(base, lora.peft(("att/W_query", "att/W_nothing")), jax.random.PRNGKey(0))
    params = lora.add_lora(base, LORA, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="already hold LoRA"):
        lora.add_lora(params, LORA, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no LoRA weights"):
        lora_optimizer(optax.sgd(0.1), base)
    with pytest.raises(ValueError, match="un-jitted"):
        lora.apply_with_lora(jax.jit(CONFIG.logits), LORA)
    with pytest.raises(ValueError, match="raw weight has no twin name"):
        t_lora.lora_to_torch(DECODER, lora.add_lora(interop.param_shapes(DECODER), LORA, jax.random.PRNGKey(0)))

    model, x = General(), jnp.ones((1, 4))
    base = model.init(jax.random.PRNGKey(0), x)["params"]
    apply = lambda q, t: model.apply({"params": q}, t)  # noqa: E731
    p = lora.add_lora(base, lora.peft(("general",)), jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="general, a DenseGeneral; only nn.Dense"):
        lora.apply_with_lora(apply, LORA)(p, x)

    p = lora.add_lora(base, lora.peft(("dense",)), jax.random.PRNGKey(1))
    hidden_jit = jax.jit(apply)  # a jit cache inside apply_fn would hide the interceptor
    lora.apply_with_lora(lambda q, t: hidden_jit(q, t), LORA)(p, x)  # first trace: intercepted
    with pytest.raises(ValueError, match="no nn.Dense call reached the LoRA interceptor"):
        lora.apply_with_lora(lambda q, t: hidden_jit(q, t), lora.raschka(RANK, 2 * ALPHA))(p, x)
