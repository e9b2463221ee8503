"""The imperative PyTorch twins, written as the books write them.

Needs the optional ``torch`` extra (``pip install -e '.[torch]'``). Nothing in the core package
imports this subpackage; import the family you need, e.g. ``from jaxllm.torch_ref import mlp``.
"""
