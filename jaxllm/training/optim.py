"""An optimiser factory over optax that mirrors ``torch.optim`` semantics.

* ``sgd``: momentum buffer ``b = m*b + g`` (torch's, optax's ``trace``), optional Nesterov;
  ``weight_decay`` is torch's *coupled* L2 (added to the gradient).
* ``adam``: torch's ``Adam``; ``weight_decay`` again coupled L2.
* ``adamw``: decoupled decay ``p -= lr*wd*p``. optax defaults it to 1e-4 and torch to 0.01, so
  we refuse to guess: pass ``weight_decay`` explicitly.
* ``muon``: torch's ``Muon`` (Keller Jordan's) for the 2-D matrices of ``muon_blocks`` (the
  top-level param names of a model's blocks; every 2-D param when empty) at ``muon_lr``, and
  ``AdamW`` at ``lr`` for the rest (embeddings, output head, norms, biases), as Muon's authors
  advise. Its update: momentum ``b = lerp(b, g, 1 - 0.95)``, Nesterov ``u = lerp(g, b, 0.95)``,
  five Newton-Schulz steps orthogonalise ``u``, scaled by ``sqrt(max(1, fan_out / fan_in))``,
  decoupled decay ``p -= lr*wd*p``. Unlike torch, which runs Newton-Schulz in bf16, it runs in the
  params' dtype (fp32): the twin test patches torch's to fp32 so both compute the same thing.
Schedules: ``constant``, ``warmup_cosine`` (linear warmup from 0, cosine down to ``min_lr``) or
``wsd`` (warmup, stable at ``lr``, then a linear decay to ``min_lr`` over the last
``decay_fraction`` of the run). ``constant`` and ``wsd`` extend: a longer run trains its earlier
steps at the same rates once the warmup is over (``EXTENDABLE``).
``clip_norm`` clips the global gradient norm first (torch's ``clip_grad_norm_``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw", "muon")
SCHEDULES = ("constant", "warmup_cosine", "wsd")
EXTENDABLE = ("constant", "wsd")  # the run's length moves only wsd's decay, never the rates before it
DEFAULT_WARMUP = 100  # the most warmup steps a decaying schedule gets by default (default_warmup)


def default_warmup(schedule: str, total: int, longest: int = DEFAULT_WARMUP) -> int:
    """The warmup a run of ``total`` steps gets unless one is asked for: none under a constant rate,
    else a tenth of the run, at most ``longest`` steps."""
    return 0 if schedule == "constant" else min(longest, total // 10)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float | None = None
    momentum: float = 0.0
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr: float = 0.0
    decay_fraction: float = 0.2
    clip_norm: float | None = None
    muon_lr: float = 0.02
    muon_blocks: tuple[str, ...] = ()

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.name in ("adamw", "muon") and self.weight_decay is None:
            raise ValueError(
                f"{self.name} needs weight_decay passed explicitly (torch's AdamW defaults to 0.01, "
                "optax's adamw to 1e-4); use 0.0 for none"
            )
        if not self.lr > 0 or not self.muon_lr > 0:
            raise ValueError(f"lr and muon_lr must be > 0, got {self.lr} and {self.muon_lr}")
        object.__setattr__(self, "muon_blocks", tuple(self.muon_blocks))  # a list from a saved run config
        if self.schedule != "constant" and not self.total_steps:
            raise ValueError(f"the {self.schedule} schedule needs total_steps")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must lie in (0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps and self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})")
        if self.schedule == "warmup_cosine" and self.warmup_steps >= self.total_steps:
            # optax's cosine part needs at least one step (its own error names decay_steps)
            raise ValueError(f"warmup_cosine needs warmup_steps ({self.warmup_steps}) < total_steps "
                             f"({self.total_steps}) to leave the decay a step")
        if self.schedule == "wsd" and self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"wsd's warmup ({self.warmup_steps} steps) and decay ({self.decay_steps} steps, "
                             f"decay_fraction {self.decay_fraction}) overlap in a run of {self.total_steps} steps")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if (self.weight_decay or 0.0) < 0 or self.momentum < 0:
            raise ValueError(f"weight_decay and momentum must be >= 0, got {self.weight_decay} and {self.momentum}")


    @property
    def decay_steps(self) -> int:
        """wsd: the steps of the final decay (at least one)."""
        return max(1, round(self.decay_fraction * (self.total_steps or 0)))


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """step -> learning rate."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "wsd":
        stable_end = cfg.total_steps - cfg.decay_steps
        return optax.join_schedules([
            optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
            optax.constant_schedule(cfg.lr),
            optax.linear_schedule(cfg.lr, cfg.min_lr, cfg.decay_steps),
        ], [cfg.warmup_steps, stable_end])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.min_lr,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    lr = make_schedule(cfg)
    wd = cfg.weight_decay or 0.0
    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name in ("sgd", "adam") and wd:
        chain.append(optax.add_decayed_weights(wd))  # coupled L2, as torch's SGD/Adam
    if cfg.name == "sgd":
        chain.append(optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif cfg.name == "muon":
        chain.append(muon(cfg, lr, wd))
    elif cfg.name == "adam":
        chain.append(optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    else:
        chain.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd))
    return optax.chain(*chain) if len(chain) > 1 else chain[0]


# torch.optim.Muon's defaults (its Newton-Schulz coefficients maximise the slope at zero)
MUON_MOMENTUM = 0.95
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def muon(cfg: OptimizerConfig, adamw_lr: optax.Schedule, wd: float) -> optax.GradientTransformation:
    """Muon on the 2-D matrices of ``cfg.muon_blocks``, AdamW on every other param (module docstring)."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, leaf: muon_label(path, leaf, cfg.muon_blocks), params)

    muon_lr = make_schedule(dataclasses.replace(cfg, lr=cfg.muon_lr))
    return optax.partition({
        "muon": optax.chain(scale_by_muon(), optax.add_decayed_weights(wd), optax.scale_by_learning_rate(muon_lr)),
        "adamw": optax.adamw(adamw_lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd),
    }, labels)


def muon_label(path, leaf, blocks) -> str:
    """``"muon"`` for a 2-D param under one of the top-level names ``blocks`` (any, when empty), else ``"adamw"``."""
    top = getattr(path[0], "key", None)
    return "muon" if leaf.ndim == 2 and (not blocks or top in blocks) else "adamw"


def scale_by_muon(momentum: float = MUON_MOMENTUM, nesterov: bool = True) -> optax.GradientTransformation:
    """torch.optim.Muon's direction for Flax kernels ``[fan_in, fan_out]`` (torch's weight transposed)."""

    def init(params):
        return optax.TraceState(trace=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        buf = jax.tree_util.tree_map(lambda b, g: b + (1 - momentum) * (g - b), state.trace, grads)
        direction = jax.tree_util.tree_map(lambda g, b: g + momentum * (b - g), grads, buf) if nesterov else buf
        scaled = jax.tree_util.tree_map(
            lambda u: orthogonalize(u) * math.sqrt(max(1.0, u.shape[1] / u.shape[0])), direction)
        return scaled, optax.TraceState(trace=buf)

    return optax.GradientTransformation(init, update)


def orthogonalize(matrix: jax.Array) -> jax.Array:
    """Quintic Newton-Schulz: ``matrix`` -> about ``U V^T`` of its SVD (singular values ~ 0.5-1.5),
    computed on the wide orientation (rows <= columns), as torch does."""
    a, b, c = NS_COEFFICIENTS
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix
    x = x / jnp.maximum(jnp.linalg.norm(x), NS_EPS)  # spectral norm <= 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x
