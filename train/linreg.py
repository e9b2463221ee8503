"""``python train/linreg.py`` = ``jaxllm train linreg`` (the job: ``jaxllm/jobs/linreg.py``), kept so old commands work."""

from jaxllm.jobs.linreg import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
