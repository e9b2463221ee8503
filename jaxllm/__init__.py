"""jaxllm: functional JAX/Flax twins of the textbook language models.

Layout (arrows point one way): ``jaxllm.command`` -> ``jaxllm.jobs`` -> ``jaxllm.training`` -> ``jaxllm.models`` ->
``jaxllm.nn``. ``jaxllm.data`` and ``jaxllm.interop`` depend on nothing above them, and
``jaxllm.torch_ref`` (the imperative PyTorch twins) is imported only on demand.
"""

__version__ = "0.1.0"
