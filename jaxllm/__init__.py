"""jaxllm: functional JAX/Flax twins of the textbook language models.

Layers, top to bottom (imports point down only; tests/test_layers.py checks it): ``command``;
``jobs`` and ``bench``; ``chat`` and ``export``; ``cli``; ``pretrained``; ``training``; ``generate``,
``interop`` and ``torch_ref`` (the imperative PyTorch twins, imported only on demand); ``models``;
``nn``; ``data``; and the bottom (``config``, ``validate``, ``runio``, ``jax_internals``, device and
compile-cache setup).
"""

__version__ = "0.1.0"
