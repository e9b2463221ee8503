"""Side-by-side benchmarks: ``python -m jaxllm.bench train generate rnn parallel`` (see ``__main__``)."""
