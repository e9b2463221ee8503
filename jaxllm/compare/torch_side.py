"""The PyTorch half of a comparison: torch's optimiser for a jaxllm ``OptimizerConfig``, and the
twin's training step, written as the books write it (``zero_grad``, forward, loss, ``backward``,
``step``).

The optimisers are torch's own (``SGD``, ``Adam``, ``AdamW``, ``Muon`` for the blocks' matrices
beside ``AdamW``), with torch's ``clip_grad_norm_`` and a ``LambdaLR`` whose factors are the JAX
schedule's learning rates divided by the peak: both sides step with the same rate at every step.
"""

from __future__ import annotations

import numpy as np
import torch

from jaxllm import interop
from jaxllm.training.optim import OptimizerConfig, make_schedule


def learning_rates(config: OptimizerConfig, steps: int, peak: float) -> np.ndarray:
    """The schedule's rate at steps 0..steps-1 over ``peak`` (the factors of torch's LambdaLR)."""
    import jax
    import jax.numpy as jnp

    rates = np.asarray(jax.jit(make_schedule(config))(jnp.arange(steps)), np.float64)  # one compile, not one per op
    return np.broadcast_to(rates, (steps,)) / peak  # a constant schedule answers one number


def muon_names(config, params) -> set[str]:
    """The torch names of the parameters that ``--optimizer muon`` trains with Muon: the 2-D
    matrices under ``config.muon_blocks`` (every 2-D one when empty), as ``jaxllm.training.optim.muon``
    labels them."""
    import jax

    blocks = set(config.muon_blocks)
    names = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(p.key for p in path)
        if np.ndim(leaf) == 2 and (not blocks or keys[0] in blocks):
            names.add(interop.torch_key(keys))
    return names


class TorchOptimizer:
    """torch's optimiser(s) for ``config`` over ``twin``'s parameters, stepped as one."""

    def __init__(self, config: OptimizerConfig, twin: torch.nn.Module, steps: int, muon: set[str] = frozenset()):
        named = list(twin.named_parameters())
        self.params = [p for _, p in named]
        self.clip = config.clip_norm
        wd = config.weight_decay or 0.0
        betas = (config.b1, config.b2)
        if config.name == "sgd":
            groups = [torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                      weight_decay=wd)]
        elif config.name == "adam":
            groups = [torch.optim.Adam(self.params, lr=config.lr, betas=betas, eps=config.eps, weight_decay=wd)]
        elif config.name == "adamw":
            groups = [torch.optim.AdamW(self.params, lr=config.lr, betas=betas, eps=config.eps, weight_decay=wd)]
        else:  # muon: Muon on the blocks' matrices, AdamW on the rest
            matrices = [p for n, p in named if n in muon]
            rest = [p for n, p in named if n not in muon]
            groups = [torch.optim.Muon(matrices, lr=config.muon_lr, weight_decay=wd)]
            if rest:
                groups.append(torch.optim.AdamW(rest, lr=config.lr, betas=betas, eps=config.eps, weight_decay=wd))
        factors = learning_rates(config, steps, config.lr)
        last = len(factors) - 1
        self.optimizers = groups
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda t: float(factors[min(t, last)]))
                           for opt in groups]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        for opt, sched in zip(self.optimizers, self.schedulers):
            opt.step()
            sched.step()


def to_torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A numpy batch as torch tensors: ids and labels as int64, as torch's losses expect."""
    out = {}
    for key, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = tensor.long() if value.dtype.kind in "iu" else tensor
    return out


def load_jax_params(config, twin: torch.nn.Module, params) -> None:
    """Copy the Flax ``params`` into ``twin`` through ``jaxllm.interop``; every parameter of the
    twin must get one (buffers such as GPT-2's causal masks keep theirs)."""
    state = interop.to_torch(config, params)
    names = {n for n, _ in twin.named_parameters()}
    if set(state) != names:
        raise ValueError(f"the twin's parameters and the JAX model's differ: {sorted(names ^ set(state))}")
    twin.load_state_dict(state, strict=False)


def autocast(dtype: str):
    """The context the twin's forward runs in: bf16 autocast on the CPU, or nothing for fp32."""
    import contextlib

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def greedy(twin: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """The twin's greedy continuation of ``prompt``, recomputing the whole sequence at each token
    (the books' ``generate_text_simple``)."""
    was_training = twin.training
    twin.eval()
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        for _ in range(new_tokens):
            out = twin(ids)
            logits = out[0] if isinstance(out, tuple) else out
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    twin.train(was_training)
    return ids[0, len(prompt):].tolist()
