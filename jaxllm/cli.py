"""The command boundary of every job: ``parse`` its flags into its config, ``start`` what the
run needs, and ``run`` it so that known errors end as one line and signals as a resume hint."""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from typing import Any, Callable, Sequence, TypeVar

from jaxllm import orbax_noise, runio
from jaxllm.options import Devices, MultiHost, Run, parser
from jaxllm.training import distributed

C = TypeVar("C")


def parse(cls: type[C], argv: Sequence[str] | None = None) -> C:
    """The job's config (``cls``, a frozen dataclass of ``jaxllm.options``) from ``argv``; nothing starts."""
    return parser.parse(cls, argv, prog=_command)


def start(config: Any, *, claim: bool = True) -> None:
    """Everything a job's config asks of the process, before any work, in this order: JAX's
    persistent compilation cache (unless ``--no-compile-cache``), the CPU device count, joining a
    multi-host run, then (``claim``) claiming ``--out`` (``jaxllm.runio.claim_run_dir``: a writable
    directory no other live run holds and no other job's run is in; ``--resume`` needs a
    checkpoint; ``--overwrite`` sets the old run aside until the new one has a checkpoint)."""
    global _claimed
    from jaxllm import compile_cache, cpu_devices

    run = config.run if isinstance(getattr(config, "run", None), Run) else None  # generate's run is a directory
    compilation = getattr(run, "compilation", None) or getattr(config, "compilation", None)
    if compilation is not None:
        compile_cache.enable(not compilation.no_compile_cache)
    devices, hosts = getattr(config, "devices", None), getattr(config, "hosts", None)
    if isinstance(devices, Devices):  # before JAX starts its backends
        cpu_devices.request(devices.cpu_devices, per_core=getattr(config, "SPLIT_CPU", True))
    if isinstance(hosts, MultiHost):
        distributed.initialize(hosts.coordinator, hosts.num_processes, hosts.process_id)
    if run is None or not claim:
        return
    created = not os.path.exists(run.out)
    runio.claim_run_dir(run.out, config.JOB, resume=run.resume, overwrite=run.overwrite)
    _claimed = (run.out, created)
    distributed.barrier("--out claimed")  # no process looks at --out while process 0 sets the old run aside


# the command that runs a job ("jaxllm train lm"; None: a script, python train/lm.py): names the
# job in its errors and --help, and starts the line that resumes it
_command: str | None = None


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, *,
        prog: str | None = None) -> None:
    """Run a job's ``main`` as a command (``prog``: its name, e.g. ``jaxllm train lm``): bad input,
    missing data, divergence or a file that cannot be written exits 2 with one ``error:`` line;
    SIGINT/SIGTERM exit 130/143 with one line saying how to resume; never a traceback for these."""
    global _command
    import signal

    from jaxllm.data.tabular import DataUnavailable
    from jaxllm.training.checkpoint import CheckpointWriteError
    from jaxllm.training.loop import TrainingDiverged, TrainingInterrupted

    def terminate(signum, frame):  # outside training (which saves first), SIGTERM ends quietly
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    orbax_noise.install()
    _command = prog
    try:
        main(argv)
    except (ValueError, DataUnavailable, TrainingDiverged, OSError) as exc:
        _after_failed_run()
        print(f"error: {exc}", file=sys.stderr)
        # a failed save leaves orbax's other writes of the step behind: the interpreter's shutdown
        # would report each of them after the error line, so the process ends now
        _exit_alone(2, now=isinstance(exc, CheckpointWriteError))
    except TrainingInterrupted as exc:  # every process stops at the same step: they exit together
        resume = (f"resume with: {resume_command(argv)}" if exc.last_checkpoint is not None
                  else "no checkpoint yet: run the same command again to start over")
        print(f"interrupted: {exc}; {resume}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        print("interrupted outside the training loop: checkpoints already written are kept", file=sys.stderr)
        _exit_alone(143 if isinstance(exc, _Terminated) else 130)
    except Exception:
        if distributed.process_count() == 1:
            raise
        traceback.print_exc()
        _exit_alone(1)
    finally:
        _command = None


# the --out that parse_args claimed in this process, and whether the claim created it
_claimed: tuple[str, bool] | None = None


def _after_failed_run() -> None:
    """A run that failed before its first checkpoint gives back the run ``--overwrite`` set aside,
    and leaves no directory it created with nothing in it but its own start."""
    if _claimed is None or not runio.is_first_process():
        return
    out, created = _claimed
    runio.restore_previous_run(out)
    started = runio.has_checkpoints(out) or any(os.path.exists(os.path.join(out, name))
                                                for name in ("metrics.jsonl", "summary.json"))
    if created and not started:
        runio.unlock_run_dir(out)
        shutil.rmtree(out, ignore_errors=True)


def _exit_alone(code: int, *, now: bool = False) -> None:
    """Exit with ``code`` -- at once when this is one of several processes: an error may stop one
    process only, and a normal exit would wait in JAX's shutdown barrier (minutes) for the others,
    which wait for it in their next collective; exiting lets the coordinator stop them all now.
    ``now``: at once in any case, skipping the interpreter's shutdown."""
    if now or distributed.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop."""


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line that continues this run: the same flags, ``--overwrite`` dropped, ``--resume`` added."""
    import shlex

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*(shlex.split(_command) if _command else ["python", sys.argv[0]]), *args])
