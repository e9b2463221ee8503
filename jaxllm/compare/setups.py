"""What a comparison trains: for each job, the JAX model, its PyTorch twin holding the same
initial weights, both losses, the job's batches and optimiser, built from the job's own flags."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxllm.data.batches import ArrayBatches
from jaxllm.training.losses import LOSSES, lm_loss
from jaxllm.training.optim import OptimizerConfig


@dataclasses.dataclass
class Pair:
    """One model in both styles. ``batches.next()`` gives the numpy batches both train on (JAX's
    keys); ``jax_loss(params, batch, key) -> (loss, aux)``; ``torch_loss(twin, torch_batch) ->
    loss``; ``continue_text(jax_params, twin)`` (language models) -> the greedy continuations of
    one prompt by each, decoded."""

    title: str
    config: Any
    params: Any
    make_twin: Callable[[], Any]
    jax_loss: Callable
    torch_loss: Callable
    batches: Any
    steps: int
    optimizer: OptimizerConfig
    unit: str
    units_per_batch: int
    notes: list[str] = dataclasses.field(default_factory=list)
    continue_text: Callable | None = None
    torch_state: Callable | None = None  # params -> the twin's state dict (default: interop's rule)
    trainable: Any = None  # a mask of the params that train, the rest frozen on both sides (None: all)

    def torch_named(self, tree) -> dict[str, np.ndarray]:
        """A params-shaped ``tree`` (params, gradients) under the twin's names, as numpy arrays."""
        from jaxllm import interop

        if self.torch_state is None:
            return interop.to_torch_numpy(jax.device_get(tree))
        return {name: np.asarray(value) for name, value in self.torch_state(jax.device_get(tree)).items()}


def _torch_softmax(twin, batch):
    import torch.nn.functional as F

    return F.cross_entropy(twin(batch["x"]), batch["y"])


def _torch_binary(twin, batch):
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(twin(batch["x"])[:, 0], batch["y"].float())


def _torch_lm(twin, batch):
    import torch.nn.functional as F

    out = twin(batch["inputs"])
    logits = out[0] if isinstance(out, tuple) else out  # the RNN twin also returns its hidden state
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())


def supervised(cfg, *, title: str, config, make_twin, loss: str, train) -> Pair:
    """A classifier job (``mlp``, ``logreg``, ``cnn``) on its training split ``train = (x, y)``."""
    from jaxllm.training.supervised import validate_arrays

    arrays = validate_arrays(config, *train, loss)
    batch_size = cfg.optim.batch_size or len(arrays["x"])
    batches = ArrayBatches(arrays, batch_size, shuffle=cfg.optim.batch_size is not None, seed=cfg.run.seed)
    steps = cfg.run.total_steps(batches.steps_per_epoch)
    return Pair(title, config, config.init(jax.random.PRNGKey(cfg.run.seed)), make_twin, LOSSES[loss](config.apply),
                {"softmax": _torch_softmax, "binary": _torch_binary}[loss], batches, steps,
                cfg.optim.build(steps), "examples", batch_size)


def mlp(cfg) -> Pair:
    from jaxllm.data.tabular import breast_cancer
    from jaxllm.models.mlp import MLPConfig
    from jaxllm.torch_ref import mlp as t_mlp

    train, _ = breast_cancer(seed=cfg.run.seed)
    config = MLPConfig(num_inputs=train[0].shape[1], num_outputs=2, hidden=cfg.hidden)
    return supervised(cfg, title="MLP", config=config, make_twin=lambda: t_mlp.from_config(config), loss="softmax",
                      train=train)


def logreg(cfg) -> Pair:
    from jaxllm.data.tabular import will_buy
    from jaxllm.models.linear import LogisticConfig
    from jaxllm.torch_ref import linear as t_linear

    config = LogisticConfig(num_inputs=2)
    return supervised(cfg, title="logistic regression", config=config,
                      make_twin=lambda: t_linear.logistic_regression(2)[:-1], loss="binary", train=will_buy())


def cnn(cfg) -> Pair:
    from jaxllm.jobs.cnn import DATASETS
    from jaxllm.torch_ref import cnn as t_cnn

    load, make_config = DATASETS[cfg.dataset]
    train, _ = load(seed=cfg.run.seed)
    config = make_config()
    return supervised(cfg, title=f"CNN {cfg.dataset}", config=config, make_twin=lambda: t_cnn.from_config(config),
                      loss="softmax", train=train)


def _lm_pair(cfg, config, data, *, title: str, context: int, stride: int, make_twin, continue_text,
             muon_blocks=(), notes=()) -> Pair:
    from jaxllm.data.windows import lm_windows

    batches = ArrayBatches(lm_windows(data.train_ids, context, stride, vocab_size=data.vocab_size),
                           cfg.optim.batch_size, seed=cfg.run.seed)
    steps = cfg.run.total_steps(batches.steps_per_epoch)
    return Pair(title, config, config.init(jax.random.PRNGKey(cfg.run.seed)), make_twin, lm_loss(config), _torch_lm,
                batches, steps, cfg.optim.build(steps, muon_blocks=muon_blocks), "tokens",
                cfg.optim.batch_size * context, list(notes), continue_text)


def lm(cfg) -> Pair:
    """``jaxllm train lm``'s model and data, every preset (a config no twin can express is refused when
    the twin is built)."""
    from jaxllm.data.lm_data import prepare_lm_data
    from jaxllm.jobs.lm import build_config, resolve_data
    from jaxllm.torch_ref import twin_of

    if cfg.mode != "full":
        raise ValueError("jaxllm compare lm trains every weight from a fresh init (--mode full); LoRA is compared "
                         "by jaxllm compare classify")
    notes = []
    dropout = cfg.dropout
    if cfg.model == "gpt2" and dropout is None:
        dropout = 0.0
        notes.append("dropout is off (--dropout 0): its masks are drawn differently by each framework, so the two "
                     "trajectories could not be compared step by step")
    elif dropout:
        notes.append(f"--dropout {dropout}: each framework draws its own masks, so the trajectories part from the "
                     "first step by design; compare the curves' levels, not their steps")
    cfg, data_cfg, _ = resolve_data(cfg)
    config = build_config(cfg.model, cfg.preset_name, data_cfg.vocab_size, cfg.context, d_model=cfg.d_model,
                          layers=cfg.layers, heads=cfg.heads, dropout=dropout)
    data = prepare_lm_data(data_cfg.text, tokenizer=data_cfg.tokenizer, vocab_size=data_cfg.vocab_size,
                           seed=cfg.run.seed, out_dir=cfg.run.out)
    config = config.replace(vocab_size=data.vocab_size)
    prompt = _prompt(data)

    def continue_text(params, twin):  # within the context: the prompt's end and new tokens fit it
        from jaxllm.compare.torch_side import greedy
        from jaxllm.generate import fit_context, generate

        ids, n, _ = fit_context(prompt, cfg.sample_tokens, config.context_limit)
        jax_ids = generate(config, params, [ids], max_new_tokens=n, key=jax.random.PRNGKey(0))[0]
        return _decoded(data.encoding, ids, jax_ids, greedy(twin, ids, n))

    return _lm_pair(cfg, config, data, title=f"{cfg.model} LM ({cfg.preset_name})", context=cfg.context,
                    stride=cfg.window_stride, make_twin=lambda: twin_of(config), continue_text=continue_text,
                    muon_blocks=config.block_names, notes=notes)


def rnn(cfg) -> Pair:
    from jaxllm.data.lm_data import prepare_lm_data
    from jaxllm.models import rnn as rnn_models
    from jaxllm.torch_ref import twin_of

    text = cfg.data
    data = prepare_lm_data(text.text, tokenizer=text.tokenizer, vocab_size=text.vocab_size, seed=cfg.run.seed,
                           out_dir=cfg.run.out)
    config = rnn_models.RNNConfig(vocab_size=data.vocab_size, emb_dim=cfg.emb_dim, num_layers=cfg.layers)
    prompt = _prompt(data)

    def continue_text(params, twin):
        from jaxllm.compare.torch_side import greedy
        from jaxllm.generate import sample_recurrent

        n = cfg.sample_tokens
        jax_ids = sample_recurrent(config, params, prompt, max_new_tokens=n, key=jax.random.PRNGKey(0), temperature=0.0)
        return _decoded(data.encoding, prompt, jax_ids, greedy(twin, prompt, n))

    return _lm_pair(cfg, config, data, title="Elman RNN LM", context=cfg.context,
                    stride=cfg.context if cfg.stride is None else cfg.stride, make_twin=lambda: twin_of(config),
                    continue_text=continue_text)


def _prompt(data) -> list[int]:
    from jaxllm.data.tokenizer import encode

    return encode(data.encoding, data.val_text[:40])


def _decoded(encoding, prompt, jax_ids, torch_ids) -> dict:
    return {"prompt": encoding.decode(prompt), "jax": encoding.decode(list(jax_ids)),
            "torch": encoding.decode(list(torch_ids)), "identical": list(map(int, jax_ids)) == list(torch_ids),
            "tokens": len(jax_ids)}


def classify(cfg) -> Pair:
    """``jaxllm finetune classify --mode lora`` on a GPT-2 base: the book's recipe on both sides (a new
    class head, every base weight frozen, LoRA on every Linear, the class read at the last real token)."""
    from jaxllm.jobs.classify import prepare_data
    from jaxllm.models import classifier
    from jaxllm.nn import lora
    from jaxllm.pretrained import load_base
    from jaxllm.torch_ref import lora as t_lora
    from jaxllm.training.freeze import trainable_mask, trainable_predicate
    from jaxllm.training.losses import classification_loss

    if cfg.mode_name != "lora":
        raise ValueError(f"jaxllm compare classify compares --mode lora (the book's appendix E), not --mode {cfg.mode_name}")
    base = load_base(cfg.base)
    if base.config.family != "gpt2":
        raise ValueError(f"--base {cfg.base} is a {base.config.family} model: the twins' LoRA wraps nn.Linear layers, "
                         "which only the GPT-2 twin has (the decoders' matrices are raw parameters)")
    lm_config = base.config.with_dropout(0.0 if cfg.dropout is None else cfg.dropout)
    splits, label_names, _, _ = prepare_data(cfg, base.encoding, lm_config.context_limit)
    key_head, key_lora = jax.random.split(jax.random.PRNGKey(cfg.run.seed), 3)[:2]
    config, params = classifier.from_lm(lm_config, base.params, len(label_names), key_head)
    lora_cfg = lora.raschka(rank=cfg.adapters.rank, alpha=cfg.adapters.alpha)
    params = lora.add_lora(params, lora_cfg, key_lora)
    apply = lora.apply_with_lora(lambda p, tokens, key=None: config.logits(p, tokens, key=key), lora_cfg)

    def make_twin():
        import torch

        from jaxllm.torch_ref import gpt2 as t_gpt2

        twin = t_gpt2.GPTModel(config.to_twin_dict())
        twin.out_head = torch.nn.Linear(config.emb_dim, len(label_names))
        for p in twin.parameters():
            p.requires_grad = False
        return t_lora.replace_linear_with_lora(twin, lora_cfg.rank, lora_cfg.alpha)

    batches = ArrayBatches(splits["train"].arrays(), cfg.optim.batch_size, seed=cfg.run.seed)
    steps = cfg.run.total_steps(batches.steps_per_epoch)
    return Pair(f"classifier (LoRA rank {lora_cfg.rank})", config, params, make_twin, classification_loss(apply),
                _torch_classify, batches, steps, cfg.optim_for(steps).build(steps), "examples", cfg.optim.batch_size,
                torch_state=lambda tree: t_lora.lora_to_torch(config, tree),
                trainable=trainable_mask(params, trainable_predicate(config, "lora")))


def _torch_classify(twin, batch):
    import torch
    import torch.nn.functional as F

    logits = twin(batch["tokens"])
    last = logits[torch.arange(logits.shape[0]), batch["lengths"] - 1]
    return F.cross_entropy(last.float(), batch["labels"])


SETUPS = {"lm": lm, "rnn_lm": rnn, "mlp": mlp, "logreg": logreg, "cnn": cnn, "classify": classify}
