"""Model families. Importing a family registers its config for checkpoint loading."""

from jaxllm.models import cnn, gpt2, linear, mlp, rnn, transformer  # noqa: F401  (register configs)
