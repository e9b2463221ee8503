"""``python train/mlp.py`` = ``jaxllm train mlp`` (the job: ``jaxllm/jobs/mlp.py``), kept so old commands work."""

from jaxllm.jobs.mlp import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
