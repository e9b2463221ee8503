"""``python train/cnn.py`` = ``jaxllm train cnn`` (the job: ``jaxllm/jobs/cnn.py``), kept so old commands work."""

from jaxllm.jobs.cnn import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
