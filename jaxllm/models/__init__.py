"""Model families. Importing a family registers its config for checkpoint loading.

``LANGUAGE_MODELS`` names the transformer language models the scripts build by ``--model``: each
entry is a model file with ``PRESETS`` and ``preset(name, vocab_size, context, *, d_model, layers,
heads, dropout)``; everything else goes through the config's interface (``jaxllm.models.lm``).
"""

from jaxllm.models import cnn, gpt2, linear, mlp, rnn, transformer  # noqa: F401  (register configs)

LANGUAGE_MODELS = {"decoder": transformer, "gpt2": gpt2}


def hf_config_class(model_type: str | None):
    """The language-model config class that maps Hugging Face ``model_type`` (``ValueError`` if none)."""
    known = {cls.hf_model_type: cls for cls in (transformer.TransformerConfig, gpt2.GPT2Config)}
    if model_type not in known:
        raise ValueError(f"no Hugging Face mapping for model_type {model_type!r}; known: {sorted(known)}")
    return known[model_type]


def language_model(model: str, preset: str | None, vocab_size: int, context: int, *, d_model: int | None = None,
                   layers: int | None = None, heads: int | None = None, dropout: float | None = None):
    """The config of ``LANGUAGE_MODELS[model]``'s ``preset`` (default: the family's first) with the
    scripts' size overrides; ``ValueError`` naming the choices for an unknown name."""
    if model not in LANGUAGE_MODELS:
        raise ValueError(f"--model must be one of {tuple(LANGUAGE_MODELS)}, got {model!r}")
    family = LANGUAGE_MODELS[model]
    preset = next(iter(family.PRESETS)) if preset is None else preset
    if preset not in family.PRESETS:
        raise ValueError(f"--preset for --model {model} must be one of {tuple(family.PRESETS)}, got {preset!r}")
    return family.preset(preset, vocab_size, context, d_model=d_model, layers=layers, heads=heads, dropout=dropout)
