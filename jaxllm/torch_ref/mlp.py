"""Raschka's appendix-A ``NeuralNetwork`` and Burkov's two-layer sigmoid net."""

from __future__ import annotations

from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


class NeuralNetwork(nn.Module):
    """Raschka appendix A: ``layers.0 Linear(in, 30) -> ReLU -> layers.2 Linear(30, 20) -> ReLU -> layers.4``.

    ``hidden`` and ``activation`` generalise the book's defaults; the output is logits.
    """

    def __init__(self, num_inputs, num_outputs, hidden=(30, 20), activation="relu"):
        super().__init__()
        widths = (num_inputs, *hidden, num_outputs)
        modules = []
        for i in range(len(widths) - 1):
            modules.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                modules.append(_ACTIVATIONS[activation]())
        self.layers = nn.Sequential(*modules)

    def forward(self, x):
        return self.layers(x)


def two_layer_sigmoid_net(num_inputs: int = 2, hidden: int = 100) -> nn.Sequential:
    """Burkov ch. 1: ``Linear(2, 100) -> Sigmoid -> Linear(100, 1) -> Sigmoid``; use ``net[:-1]`` for logits."""
    return nn.Sequential(nn.Linear(num_inputs, hidden), nn.Sigmoid(), nn.Linear(hidden, 1), nn.Sigmoid())


def from_config(config):
    """The twin of a ``jaxllm.models.mlp.MLPConfig`` (returns a module producing logits)."""
    if config.sequential_root:
        if len(config.hidden) != 1:
            raise ValueError("a bare nn.Sequential twin is defined for one hidden layer only")
        return two_layer_sigmoid_net(config.num_inputs, config.hidden[0])[:-1]
    return NeuralNetwork(config.num_inputs, config.num_outputs, config.hidden, config.activation)
