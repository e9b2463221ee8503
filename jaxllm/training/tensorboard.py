"""TensorBoard event files beside ``metrics.jsonl``: the same rows, as scalars ``<split>/<metric>``
(``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``eval/loss`` ...),
the run's flags as hyperparameters (the HPARAMS tab compares runs by them) and texts such as a
language model's ``sample.txt`` (``add_text``).

Records are written here, synchronously (TFRecord framing of tensorboardX's ``Event`` protos),
not by tensorboardX's ``SummaryWriter``: that one writes from a background thread, where a failed
write (disk full) is lost and later writes block on its full queue. Here a failure raises in the
loop, naming the file, as a failed ``metrics.jsonl`` write does.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import time
from typing import Any

from jaxllm.runio import EVENT_FILES, is_first_process, naming_the_file



def event_files(directory: str | os.PathLike) -> list[str]:
    """The event files in ``directory``, oldest first (TensorBoard reads them in name order)."""
    return sorted(glob.glob(os.path.join(glob.escape(os.fspath(directory)), EVENT_FILES)))


def open_event_log(directory: str | os.PathLike, *, resumed_at: int | None) -> "EventLog | None":
    """This run's event log on process 0 (the processes of a run share ``directory``), else None.

    A fresh run (``resumed_at=None``) removes earlier runs' event files, as it starts a fresh
    ``metrics.jsonl``; a resumed one adds a file and hides what the earlier files logged after
    ``resumed_at`` (steps trained again, as ``metrics.jsonl`` drops their rows)."""
    if not is_first_process():
        return None
    if resumed_at is None:
        for path in event_files(directory):
            os.remove(path)
    return EventLog(directory, purge_after=resumed_at)


class EventLog:
    """One new event file in ``directory``; ``append(rows)`` takes ``metrics.jsonl``'s rows."""

    def __init__(self, directory: str | os.PathLike, *, purge_after: int | None = None):
        # imported here, once, not with this module: tensorboardX's package imports torch when it is
        # installed (1.4 s), which a job that writes no events (--help, generate, export) should not pay
        from tensorboardX.proto import event_pb2, summary_pb2
        from tensorboardX.record_writer import masked_crc32c

        self._events, self._summaries, self._crc = event_pb2, summary_pb2, masked_crc32c
        Event, SessionLog = event_pb2.Event, event_pb2.SessionLog
        # nanoseconds in the name: a run resumed within the second gets a file of its own, after the first
        self.path = os.path.join(os.fspath(directory), f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}")
        with naming_the_file(self.path):
            self._file = open(self.path, "xb")
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
            if purge_after is not None:  # TensorBoard drops the earlier files' events from this step on
                self._write(Event(wall_time=time.time(), step=purge_after + 1,
                                  session_log=SessionLog(status=SessionLog.START)))
            self._file.flush()

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))

    def append(self, rows: list[dict[str, Any]]) -> None:
        """One event per row: its step, every metric as the scalar ``<split>/<metric>``."""
        if not rows:
            return
        Summary = self._summaries.Summary
        self._emit((row["step"], Summary(value=[Summary.Value(tag=f"{row['split']}/{k}", simple_value=v)
                                                for k, v in row.items() if k not in ("step", "split")]))
                   for row in rows)

    def _emit(self, summaries) -> None:
        """``(step, Summary)`` pairs as events, flushed to the OS at once: TensorBoard shows a live run."""
        with naming_the_file(self.path):
            for step, summary in summaries:
                self._write(self._events.Event(wall_time=time.time(), step=step, summary=summary))
            self._file.flush()

    def hparams(self, flags: dict[str, Any]) -> None:
        """The run's flags as TensorBoard hyperparameters (a value that is not a number, string or
        bool is shown as its text), against the runs' train and eval losses."""
        from tensorboardX.summary import hparams

        shown = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flags.items()}
        self._emit((0, summary) for summary in hparams(shown, {"train/loss": None, "eval/loss": None}))

    def text(self, tag: str, text: str, step: int) -> None:
        from tensorboardX.summary import text as text_summary

        self._emit([(step, text_summary(tag, text))])

    def close(self) -> None:
        with naming_the_file(self.path):
            self._file.close()


def add_text(directory: str | os.PathLike, tag: str, text: str, step: int) -> None:
    """``text`` under ``tag`` at ``step``, in an event file of its own (the run's log is closed by
    the time a job writes, say, its sample), on process 0."""
    if not is_first_process():
        return
    log = EventLog(directory)
    try:
        log.text(tag, text, step)
    finally:
        log.close()
