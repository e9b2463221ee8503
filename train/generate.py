"""``python train/generate.py`` = ``jaxllm generate`` (the job: ``jaxllm/jobs/generate.py``), kept so old commands work."""

from jaxllm.jobs.generate import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
