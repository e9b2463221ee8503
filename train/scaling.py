"""``python train/scaling.py`` = ``jaxllm scaling`` (the job: ``jaxllm/jobs/scaling.py``), kept so old commands work."""

from jaxllm.jobs.scaling import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
