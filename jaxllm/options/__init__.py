"""Every job's settings as one frozen dataclass: its flags, ``--help``, ``config.yaml`` and checks.

``spec`` turns a config class into flags, ``parts`` holds the shared parts (run, optimiser,
evaluation, devices, multi-host, text, sampling), ``values`` the flag value types and ``parser``
reads a command line and config files into a config.
"""

from jaxllm.options.parts import (Adapters, Compilation, Devices, Evaluation, MultiHost, Optim, Precision,
                                  Run, Sampling, TextData, fit_config, fit_kwargs,
                                  supervised_kwargs)
from jaxllm.options.spec import file_values, option

__all__ = ["Adapters", "Compilation", "Devices", "Evaluation", "MultiHost", "Optim", "Precision", "Run",
           "Sampling", "TextData", "file_values", "fit_config", "fit_kwargs", "option",
           "supervised_kwargs"]
