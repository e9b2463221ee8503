"""``python train/lm.py`` = ``jaxllm train lm`` (the job: ``jaxllm/jobs/lm.py``), kept so old commands work."""

from jaxllm.jobs.lm import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
