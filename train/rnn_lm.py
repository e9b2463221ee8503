"""``python train/rnn_lm.py`` = ``jaxllm train rnn`` (the job: ``jaxllm/jobs/rnn_lm.py``), kept so old commands work."""

from jaxllm.jobs.rnn_lm import main
from jaxllm import cli

if __name__ == "__main__":
    cli.run(main)
