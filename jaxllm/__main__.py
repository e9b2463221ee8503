"""``python -m jaxllm`` = the ``jaxllm`` command (``jaxllm.command``)."""

from jaxllm.command import main

if __name__ == "__main__":
    main()
