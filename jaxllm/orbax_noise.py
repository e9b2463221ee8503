"""What the ``jaxllm`` command hides of orbax's failure path, for the whole process.

A failed checkpoint save reaches the user as one ``error:`` line (``CheckpointWriteError``, raised
by ``jaxllm.training.checkpoint``). Around that error orbax and its tensorstore writes leave noise
that repeats it as tracebacks, some of them at exit, after the error line:

* orbax logs the failed write through absl, with a full traceback, before raising it;
* orbax closes its event loop while tensorstore still completes the step's other writes; their
  callbacks fail with "Event loop is closed" and Python prints each as an unraisable exception;
* when Python collects those abandoned writes, asyncio logs "Task (or Future) exception was never
  retrieved" for each;
* orbax cancels the step's other commit threads; one cancelled before it started never awaits its
  coroutine, and Python warns "coroutine '...' was never awaited".

These are process-wide settings (a logging filter, the unraisable hook, a warnings filter), so the
library never installs them: ``jaxllm.cli.run``, the command boundary, calls ``install()`` once.
A program that uses jaxllm as a library keeps its own settings and sees orbax's messages as they are.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings


class AbandonedOrbaxWrites(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records of orbax's own writes;
    every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (re.match(r"(Task|Future) exception was never retrieved", text) and "orbax" in text)


class OrbaxErrorRecords(logging.Filter):
    """Drops absl's ERROR records logged from orbax's own modules (a failed write, which the command
    reports in one line); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in (record.pathname or ""))


def _drop_closed_loop_callbacks(previous):
    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    return hook


def install() -> None:
    """Hide the noise above for the rest of this process (each part at most once)."""
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
    for name, kind in (("asyncio", AbandonedOrbaxWrites), ("absl", OrbaxErrorRecords)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    # the command runs no coroutines of its own: every unawaited one is an abandoned orbax commit
    # (an identical filter is replaced, not added twice)
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
