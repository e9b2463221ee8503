"""Linear regression ("PyTorch in one hour") and Burkov's ch. 1 logistic regression, imperative style."""

from __future__ import annotations

import torch
from torch import nn


def linear_regression(num_inputs: int = 1, num_outputs: int = 1) -> nn.Linear:
    """``y = x W^T + b``: the fundamentals' model (state dict: ``weight``, ``bias``)."""
    return nn.Linear(num_inputs, num_outputs)


def logistic_regression(num_inputs: int = 2) -> nn.Sequential:
    """The book's ``nn.Sequential(nn.Linear(2, 1), nn.Sigmoid())`` (keys ``0.weight``, ``0.bias``)."""
    return nn.Sequential(nn.Linear(num_inputs, 1), nn.Sigmoid())


def logits(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Everything but the final sigmoid: train on these with ``BCEWithLogitsLoss``."""
    return model[:-1](x)


def fit_by_hand(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, *,
                lr: float, epochs: int):
    """The five steps with bare tensors: predict, loss, gradient, update, reset.

    x: float32[n, in], y: float32[n, out], W: (in, out), b: (out,) initial values (copied).
    Returns (W, b, losses per epoch).
    """
    W = W.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    losses = []
    for _ in range(epochs):
        pred = x @ W + b                       # 1. predict
        loss = ((pred - y) ** 2).mean()         # 2. loss
        loss.backward()                         # 3. gradient
        with torch.no_grad():                   # 4. update
            W -= lr * W.grad
            b -= lr * b.grad
        W.grad.zero_()                          # 5. reset
        b.grad.zero_()
        losses.append(loss.item())
    return W.detach(), b.detach(), losses
