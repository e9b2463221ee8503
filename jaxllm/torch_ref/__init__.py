"""The imperative PyTorch twins, written as the books write them.

Needs the optional ``torch`` extra (``pip install -e '.[torch]'``). Nothing in the core package
imports this subpackage; import the family you need, e.g. ``from jaxllm.torch_ref import mlp``.
"""


# config family -> its twin, seeded by the caller's torch.manual_seed as the book's code would be
_TWINS = {
    # the decoder: Burkov's book model, or the Llama-style twin for the fused (llama) layout
    "transformer": lambda config: _family("llama" if config.qkv_layout == "fused" else "transformer").from_config(config),
    "gpt2": lambda config: _family("gpt2").GPTModel(config.to_twin_dict()),
    "rnn": lambda config: _family("rnn").from_config(config),
}


def _family(name: str):
    import importlib

    return importlib.import_module(f"jaxllm.torch_ref.{name}")


def twin_of(config):
    """The imperative twin of a language-model ``config`` (by its registered family), constructed
    and initialised as the book does."""
    if config.family not in _TWINS:
        raise ValueError(f"no PyTorch twin for the {config.family!r} family; known: {sorted(_TWINS)}")
    return _TWINS[config.family](config)
