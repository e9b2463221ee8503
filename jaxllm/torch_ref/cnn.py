"""The small CNN, imperative style (NCHW, as PyTorch expects)."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """images float32[batch, 1, H, W] (or [batch, H, W]) -> logits [batch, num_classes]."""

    def __init__(self, image_size=28, channels=(16, 32), hidden=64, num_classes=10):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (image_size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def from_config(config) -> ConvNet:
    return ConvNet(config.image_size, tuple(config.channels), config.hidden, config.num_classes)
