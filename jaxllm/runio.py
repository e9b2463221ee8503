"""The bottom of the package: how a run's files are written, and who may write them.

* One run per output directory: ``lock_run_dir`` takes an exclusive lock file, ``<out>/.lock``.
  The first process of a run takes an ``fcntl.flock`` on it and writes who holds it (pid, host,
  start time, command); a second run on the same directory is refused at once with that holder
  named. The kernel drops the lock when the process exits, however it exits, so a killed run never
  leaves a stale lock. Only process 0 locks: the processes of one multi-host run share their output
  directory. Locks are per process and re-entrant (a job that locks its ``--out`` and then calls
  ``fit`` on it holds one lock; ``fit`` releases a lock it took itself when it returns, the jobs
  keep theirs until they exit).
* Atomic writes (``write_atomically``, ``write_json``, ``update_json``): a reader never sees half
  a file, and a failed write names the file. They write on process 0 only
  (``is_first_process``) and do nothing elsewhere, so a job writes its run files the same way on
  one process or many.

Every layer may import this module; it imports nothing of jaxllm.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import uuid
from typing import Any

LOCK_FILE = ".lock"

_held: dict[str, int] = {}  # realpath of the directory -> open file descriptor holding its lock


class RunDirectoryBusy(ValueError):
    """Another live run holds the output directory."""


def is_first_process() -> bool:
    """Whether this is process 0 of a multi-host run (or the only process), known before or after
    ``jax.distributed`` starts: the one that writes a run's shared files."""
    import jax

    if jax.distributed.is_initialized():
        return jax.process_index() == 0
    try:
        return int(os.environ.get("JAX_PROCESS_ID") or 0) == 0
    except ValueError:
        return True


def check_output_dir(out_dir: str | os.PathLike) -> str:
    """Create ``out_dir`` if needed; ``ValueError`` naming the path and the cause when it is a file
    or cannot be created or written (read-only file system, no permission)."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a directory: choose a directory for the run's outputs")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{uuid.uuid4().hex}")  # unique across hosts and pods
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"--out {out_dir} is not writable: {exc.strerror or exc}") from exc
    return out_dir


def lock_run_dir(out_dir: str | os.PathLike, *, process_index: int | None = None) -> bool:
    """Take the run lock on ``out_dir`` (created if missing) for this process, or raise
    ``RunDirectoryBusy`` naming the run that holds it. Returns whether this call took it (False on
    processes other than 0 and when this process already holds it)."""
    out_dir = check_output_dir(out_dir)
    if not (process_index == 0 if process_index is not None else is_first_process()):
        return False
    key = os.path.realpath(out_dir)
    if key in _held:
        return False
    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirectoryBusy(f"{out_dir} is in use by another run ({holder}): wait for it to end, "
                               "or choose another --out") from None
    except OSError:
        os.close(fd)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = fd
    return True


def unlock_run_dir(out_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``out_dir`` (if held); the lock file stays, unlocked."""
    fd = _held.pop(os.path.realpath(os.fspath(out_dir)), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command', '')}".rstrip(": "))


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    if not is_first_process():
        return
    tmp = f"{os.fspath(path)}.tmp"
    with naming_the_file(path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def naming_the_file(path):
    """A failed write (disk full, quota, read-only) says which file: ``f.write`` raises an OSError
    that names only the cause."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, f"cannot write {os.fspath(path)}: {exc.strerror or exc}") from exc


def update_json(path: str | os.PathLike, fields: dict[str, Any]) -> dict[str, Any]:
    """Merge ``fields`` into the JSON object at ``path`` (created if missing); returns the result."""
    data = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({exc}): restore it, or delete it and it is "
                             "written anew") from None
    data.update(fields)
    write_json(path, data)
    return data


# -- who owns a run directory ------------------------------------------------------------------
# A run directory holds one job's run. RUN_FILE records which job made it; RUN_OUTPUTS are the
# files and folders runs write (and --overwrite replaces), EVENT_FILES TensorBoard's.
RUN_FILE = "run.json"
ADAPTERS_FILE = "adapters.safetensors"  # a LoRA run's adapters, apart from the weights they adapt
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "loss.png", "baseline", "tokenizer.json", "sample.txt",
               "test_responses.json", "classifier", "config.yaml", ADAPTERS_FILE, RUN_FILE)
EVENT_FILES = "events.out.tfevents.*"
PREVIOUS_RUN = ".previous-run"  # --overwrite moves the old run here until the new one has a checkpoint


def claim_run_dir(out_dir: str | os.PathLike, job: str, *, resume: bool, overwrite: bool) -> None:
    """Claim ``out_dir`` for a run of ``job`` before any work, or raise ``ValueError`` saying why:
    lock it (a live run there is refused), check that it holds no run of another job and that
    ``resume`` has a checkpoint to continue (a fresh start one to not overwrite), and record the job.

    ``overwrite`` removes nothing: the old run moves to ``<out>/.previous-run`` and is deleted only
    once the new run has written its first checkpoint (``discard_previous_run``); if the new run
    stops before that, ``restore_previous_run`` (the command's error path, or the next claim) puts
    it back. A claim that fails leaves no directory it created."""
    out_dir = os.fspath(out_dir)
    created = not os.path.exists(out_dir)
    lock_run_dir(out_dir)
    try:
        if is_first_process():
            _claim(out_dir, job, resume=resume, overwrite=overwrite)
    except BaseException:
        unlock_run_dir(out_dir)
        if created and is_first_process():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _claim(out_dir: str, job: str, *, resume: bool, overwrite: bool) -> None:
    if os.path.isdir(os.path.join(out_dir, PREVIOUS_RUN)):  # a run that --overwrite replaced, then was killed
        if has_checkpoints(out_dir):
            discard_previous_run(out_dir)
        else:
            restore_previous_run(out_dir)
    recorded = read_run_job(out_dir)
    if recorded not in (None, job) and not overwrite:
        raise ValueError(f"{out_dir} holds a run of another job ({recorded}); this is {job}: choose another --out, "
                         "or pass --overwrite to replace that run")
    checkpoints = os.path.join(out_dir, "checkpoints")
    if resume and not has_checkpoints(out_dir):
        raise ValueError(f"--resume: there is no checkpoint to resume from in {checkpoints} "
                         "(run without --resume to start afresh)")
    if not resume and not overwrite and has_checkpoints(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
                         "--overwrite to replace it, or choose a new --out")
    if overwrite:
        _set_aside_outputs(out_dir)
    if overwrite or recorded is None:
        write_json(os.path.join(out_dir, RUN_FILE), {**({} if overwrite else read_run(out_dir)), "job": job})


def has_checkpoints(out_dir: str | os.PathLike) -> bool:
    """Whether the run in ``out_dir`` has a checkpoint step."""
    directory = os.path.join(out_dir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def read_run_job(out_dir: str | os.PathLike) -> str | None:
    """The job recorded in ``out_dir/run.json`` (None: no record, e.g. a run older than the record)."""
    return read_run(out_dir).get("job")


def run_outputs(out_dir: str | os.PathLike) -> list[str]:
    """The paths in ``out_dir`` that runs write (what ``--overwrite`` replaces)."""
    import glob

    names = [os.path.join(out_dir, name) for name in RUN_OUTPUTS]
    return [p for p in names if os.path.lexists(p)] + sorted(glob.glob(os.path.join(glob.escape(os.fspath(out_dir)),
                                                                                   EVENT_FILES)))


def _set_aside_outputs(out_dir: str) -> None:
    previous = os.path.join(out_dir, PREVIOUS_RUN)
    outputs = run_outputs(out_dir)
    if not outputs:
        return
    os.makedirs(previous)
    for path in outputs:
        os.rename(path, os.path.join(previous, os.path.basename(path)))


def discard_previous_run(out_dir: str | os.PathLike) -> None:
    """Delete the run that ``--overwrite`` set aside (the new run has a checkpoint of its own)."""
    if is_first_process():
        shutil.rmtree(os.path.join(out_dir, PREVIOUS_RUN), ignore_errors=True)


def restore_previous_run(out_dir: str | os.PathLike) -> bool:
    """Put back the run that ``--overwrite`` set aside, replacing what the new run wrote (it has no
    checkpoint); returns whether there was one."""
    previous = os.path.join(out_dir, PREVIOUS_RUN)
    if not is_first_process() or not os.path.isdir(previous):
        return False
    for path in run_outputs(out_dir):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for name in os.listdir(previous):
        os.rename(os.path.join(previous, name), os.path.join(out_dir, name))
    os.rmdir(previous)
    print(f"note: {out_dir}: the new run stopped before its first checkpoint, so the run --overwrite replaced "
          "is back", file=sys.stderr, flush=True)
    return True


# -- what a run was trained on ------------------------------------------------------------------

def record_data(out_dir: str | os.PathLike, fingerprint: dict, *, resume: bool, accept_change: bool = False) -> None:
    """Record ``fingerprint`` (``jaxllm.data.corpus.data_fingerprint``) in ``out_dir/run.json``; on
    ``resume``, first check it against the recorded one and refuse a change, naming what changed,
    unless ``accept_change`` (then the change is recorded too)."""
    if not is_first_process():
        return
    path = os.path.join(out_dir, RUN_FILE)
    run = read_run(out_dir)
    recorded = run.get("data")
    if resume and recorded is not None and recorded != fingerprint:
        changes = _data_changes(recorded, fingerprint)
        if not accept_change:
            raise ValueError(f"--resume: the data changed since {out_dir} was trained on it ({'; '.join(changes)}): "
                             "restore it, or pass --accept-data-change to continue on the new data")
        run.setdefault("accepted_data_changes", []).append({"changes": changes, "before": recorded})
    run["data"] = fingerprint
    write_json(path, run)


def read_run(out_dir: str | os.PathLike) -> dict:
    """``out_dir/run.json`` (empty without one); a broken one is refused naming the file."""
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            run = json.load(f)
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
        return run
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}): restore it, or pass --overwrite to replace the run") from None


def describe_data(out_dir: str | os.PathLike) -> str | None:
    """One line on what the run in ``out_dir`` was trained on, or None when it recorded nothing."""
    data = read_run(out_dir).get("data") if os.path.isdir(out_dir) else None
    if not data:
        return None
    if "text" in data or "files" in data:
        return "trained on " + ", ".join(f"{f['path']} ({f['size']:,} bytes, sha256 {f['sha256'][:12]})"
                                         for f in data.get("text", data.get("files")))
    if "tokens" in data:
        return f"trained on the token directory {data['tokens']} (meta.json sha256 {data['meta_sha256'][:12]})"
    return f"trained on the {data.get('package')} package, version {data.get('version')}"


def _data_changes(before: dict, after: dict) -> list[str]:
    old = {f["path"]: f for f in before.get("text", before.get("files", []))}
    new = {f["path"]: f for f in after.get("text", after.get("files", []))}
    changes = [f"{p} is no longer used" for p in old if p not in new]
    changes += [f"{p} is new" for p in new if p not in old]
    changes += [f"{p} changed ({old[p]['size']:,} -> {new[p]['size']:,} bytes, another sha256)"
                for p in new if p in old and old[p] != new[p]]
    for key in sorted((set(before) | set(after)) - {"text", "files"}):
        if before.get(key) != after.get(key):
            changes.append(f"{key}: {before.get(key)} -> {after.get(key)}")
    return changes
