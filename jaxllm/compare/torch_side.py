"""The PyTorch half of a comparison: torch's optimiser for a jaxllm ``OptimizerConfig``, and the
twin's training step, written as the books write it (``zero_grad``, forward, loss, ``backward``,
``step``).

The optimisers are torch's own (``SGD``, ``Adam``, ``AdamW``; for ``--optimizer muon``, jaxllm's
Muon written as a torch optimiser for the blocks' matrices beside ``AdamW``), with torch's ``clip_grad_norm_`` and a ``LambdaLR`` whose factors are the JAX
schedule's learning rates divided by the peak: both sides step with the same rate at every step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from jaxllm import interop
from jaxllm.training.optim import NS_COEFFICIENTS, NS_EPS, NS_STEPS, OptimizerConfig, make_schedule, muon_label


def learning_rates(config: OptimizerConfig, steps: int, peak: float) -> np.ndarray:
    """The schedule's rate at steps 0..steps-1 over ``peak`` (the factors of torch's LambdaLR)."""
    import jax
    import jax.numpy as jnp

    rates = np.asarray(jax.jit(make_schedule(config))(jnp.arange(steps)), np.float64)  # one compile, not one per op
    return np.broadcast_to(rates, (steps,)) / peak  # a constant schedule answers one number


def muon_layouts(config, params) -> dict[str, bool]:
    """The torch names of the parameters that ``--optimizer muon`` trains with Muon (the 2-D
    matrices under ``config.muon_blocks``, every 2-D one when empty, as ``jaxllm.training.optim.muon``
    labels them), each with whether torch stores it ``[out, in]`` (an ``nn.Linear`` weight, a Flax
    ``kernel``) rather than as the Flax ``x @ W`` matrix ``[in, out]``."""
    import jax

    layouts = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if muon_label(path, leaf, config.muon_blocks) == "muon":
            keys = tuple(p.key for p in path)
            layouts[interop.torch_key(keys)] = keys[-1] == "kernel"
    return layouts


class Muon(torch.optim.Optimizer):
    """jaxllm's Muon (``jaxllm.training.optim.scale_by_muon``) as a torch optimiser: Nesterov momentum,
    five Newton-Schulz steps in the params' dtype, the step scaled by ``sqrt(max(1, fan_out / fan_in))``,
    decoupled weight decay. ``torch.optim.Muon`` differs in two ways a comparison would show as
    parting trajectories: its Newton-Schulz runs in bfloat16, and it reads every matrix as
    ``[out, in]``, which the twins' ``x @ W`` matrices are not. ``out_first``: the parameters that are."""

    def __init__(self, params, *, lr: float, weight_decay: float, out_first=(), momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.out_first = {id(p) for p in out_first}
        self.momentum = momentum

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - self.momentum)
                direction = orthogonalize(p.grad.lerp(buf, self.momentum))
                fan_out, fan_in = p.shape if id(p) in self.out_first else p.shape[::-1]
                p.mul_(1 - lr * wd)
                p.add_(direction, alpha=-lr * math.sqrt(max(1.0, fan_out / fan_in)))


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """``jaxllm.training.optim.orthogonalize`` in torch: quintic Newton-Schulz on the wide orientation."""
    a, b, c = NS_COEFFICIENTS
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class TorchOptimizer:
    """torch's optimiser(s) for ``config`` over ``twin``'s parameters, stepped as one."""

    def __init__(self, config: OptimizerConfig, twin: torch.nn.Module, steps: int, muon: dict[str, bool] | None = None):
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
            muon = muon or {}
            matrices = [p for n, p in named if n in muon]
            rest = [p for n, p in named if n not in muon]
            groups = [Muon(matrices, lr=config.muon_lr, weight_decay=wd, out_first=[p for n, p in named if muon.get(n)])]
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


def load_jax_params(config, twin: torch.nn.Module, params, torch_state=None) -> None:
    """Copy the Flax ``params`` into ``twin`` through ``jaxllm.interop`` (or ``torch_state(params)``,
    e.g. LoRA's names); every parameter of the twin must get one (buffers such as GPT-2's causal
    masks keep theirs)."""
    state = interop.to_torch(config, params) if torch_state is None else torch_state(params)
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
