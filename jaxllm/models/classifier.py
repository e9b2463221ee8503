"""A language model turned classifier (Raschka ch. 6): the vocabulary head is swapped for a new
``Linear(width, num_classes)`` and the class logits are read at the **last real token**.

Every language-model config offers ``with_classes(num_classes)`` (GPT-2's ``out_head`` becomes
``[emb_dim, C]`` with a bias, the Burkov decoder's ``output`` ``[d_model, C]`` plus
``output_bias``); the model then returns class logits at every position. ``from_lm`` copies every
base weight, drops the vocabulary head and takes the new head from the classifier's own
initialiser (``torch.nn.Linear``'s), using only the model interface (``jaxllm.models.lm``).

Inputs are right-padded (see ``jaxllm.data.classification``), so with causal attention every real
token's state is the unpadded one, and the loss (``jaxllm.training.losses.classification_loss``)
reads position ``lengths - 1`` of each row: the last real token, which has attended to the whole
text. (The book reads position -1, which for a padded row is a pad token; with the same length for
every row both agree.) What each fine-tuning mode trains is
``jaxllm.training.freeze.trainable_predicate``.
"""

from __future__ import annotations

import jax

from jaxllm.models.lm import LanguageModelConfig


def classifier_config(lm_config, num_classes: int):
    """The LM's config with a ``num_classes`` head (untied: the new head has no vocabulary to share)."""
    if not isinstance(lm_config, LanguageModelConfig):
        raise ValueError(f"a classifier needs a language-model config, got {type(lm_config).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return lm_config.with_classes(num_classes)


def from_lm(lm_config, lm_params, num_classes: int, key) -> tuple[object, dict]:
    """``(classifier config, params)``: every base weight of ``lm_params`` copied (the vocabulary
    head dropped) plus a new head, the classifier's own initialiser run from ``key``.

    The result is checked against the classifier's parameter shapes, so a base that does not
    match ``lm_config`` is refused here rather than failing inside jit."""
    config = classifier_config(lm_config, num_classes)
    fresh = config.init(key)
    vocabulary_head = set(lm_config.head_names)
    base = {k: v for k, v in dict(lm_params).items() if k not in vocabulary_head}
    params = {**base, **{name: fresh[name] for name in config.head_names}}
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)  # noqa: E731
                           for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    expected = shapes(fresh)
    if shapes(params) != expected:
        missing = sorted(set(expected) - set(shapes(params)))
        extra = sorted(set(shapes(params)) - set(expected))
        raise ValueError(f"the base parameters do not fit the classifier config: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, or shapes differ")
    return config, params
