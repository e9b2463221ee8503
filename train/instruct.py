"""``python train/instruct.py`` = ``jaxllm finetune instruct`` (the job: ``jaxllm/jobs/instruct.py``), kept so old commands work."""

from jaxllm.jobs.instruct import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
