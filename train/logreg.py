"""``python train/logreg.py`` = ``jaxllm train logreg`` (the job: ``jaxllm/jobs/logreg.py``), kept so old commands work."""

from jaxllm.jobs.logreg import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
