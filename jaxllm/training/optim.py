"""An optimiser factory over optax that mirrors ``torch.optim`` semantics.

* ``sgd``: momentum buffer ``b = m*b + g`` (torch's, optax's ``trace``), optional Nesterov;
  ``weight_decay`` is torch's *coupled* L2 (added to the gradient).
* ``adam``: torch's ``Adam``; ``weight_decay`` again coupled L2.
* ``adamw``: decoupled decay ``p -= lr*wd*p``. optax defaults it to 1e-4 and torch to 0.01, so
  we refuse to guess: pass ``weight_decay`` explicitly.
Schedules: ``constant`` or ``warmup_cosine`` (linear warmup from 0, cosine down to ``min_lr``).
``clip_norm`` clips the global gradient norm first (torch's ``clip_grad_norm_``).
"""

from __future__ import annotations

import dataclasses

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")


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
    clip_norm: float | None = None

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.name == "adamw" and self.weight_decay is None:
            raise ValueError(
                "adamw needs weight_decay passed explicitly (torch's AdamW defaults to 0.01, "
                "optax's adamw to 1e-4); use 0.0 for none"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule == "warmup_cosine" and not self.total_steps:
            raise ValueError("the warmup_cosine schedule needs total_steps")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps and self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})")
        if self.schedule == "warmup_cosine" and self.warmup_steps >= self.total_steps:
            # optax's cosine part needs at least one step (its own error names decay_steps)
            raise ValueError(f"warmup_cosine needs warmup_steps ({self.warmup_steps}) < total_steps "
                             f"({self.total_steps}) to leave the decay a step")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if (self.weight_decay or 0.0) < 0 or self.momentum < 0:
            raise ValueError(f"weight_decay and momentum must be >= 0, got {self.weight_decay} and {self.momentum}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """step -> learning rate."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
        return optax.constant_schedule(cfg.lr)
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
    elif cfg.name == "adam":
        chain.append(optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    else:
        chain.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd))
    return optax.chain(*chain) if len(chain) > 1 else chain[0]
