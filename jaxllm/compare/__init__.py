"""``jaxllm compare``: a JAX model and its PyTorch twin trained side by side from the same start
(needs the optional ``torch`` extra). ``setups`` builds both from a job's flags, ``torch_side``
holds torch's optimiser and step, ``engine`` trains and measures, ``report`` writes the files."""
