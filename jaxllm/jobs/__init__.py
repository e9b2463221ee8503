"""The jobs the ``jaxllm`` command runs (``jaxllm.command``), one module each with ``main(argv)``:
parse flags, build config + data + loss, call ``fit()``. Imported only when chosen."""
