"""``python train/ngram.py`` = ``jaxllm train ngram`` (the job: ``jaxllm/jobs/ngram.py``), kept so old commands work."""

from jaxllm.jobs.ngram import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
