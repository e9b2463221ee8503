"""``python train/classify.py`` = ``jaxllm finetune classify`` (the job: ``jaxllm/jobs/classify.py``), kept so old commands work."""

from jaxllm.jobs.classify import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
