"""Side-by-side benchmarks: ``jaxllm bench train generate rnn parallel`` (see ``__main__``)."""
