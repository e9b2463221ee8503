"""A run's flags as data: ``config.yaml``.

Every training run writes its resolved flags to ``<out>/config.yaml`` (``fit``, process 0, once
a resumed run has passed its checks); ``--config FILE`` reads such a file as the flags' defaults,
and ``--resume`` reads the run's own. Keys are the long flag names without their dashes
(``batch-size: 32``), values what the flag takes (``null`` for an unset optional one). A preset is
such a file shipped with the package, ``jaxllm/configs/<job>/<name>.yaml``, named bare
(``--config demo``). The flags themselves come from each job's config class (``jaxllm.options``).
"""

from __future__ import annotations

import os
import pathlib

CONFIG_FILE = "config.yaml"
PRESET_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def read_flags(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file; ``ValueError`` naming the file when it is not one."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"{os.fspath(path)} is not valid YAML: {getattr(exc, 'problem', None) or exc}{line}: fix or "
                         "restore it (a run's config.yaml holds its flags, one 'name: value' a line)") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ValueError(f"{os.fspath(path)} must hold a mapping of flag names to values (e.g. 'lr: 0.001')")
    return values


def write_flags(out_dir: str | os.PathLike, flags: dict) -> None:
    """``<out_dir>/config.yaml``, atomically, on process 0 only (the processes share ``out_dir``)."""
    import yaml

    from jaxllm.runio import write_atomically

    text = yaml.safe_dump(flags, sort_keys=False, default_flow_style=False)
    write_atomically(os.path.join(out_dir, CONFIG_FILE),
                     f"# the flags of this run: --resume reads them, --config FILE takes a copy\n{text}")


def presets(job: str) -> list[str]:
    """The names of the job's shipped presets."""
    return sorted(p.stem for p in (PRESET_DIR / job).glob("*.yaml"))


def preset_path(job: str, name: str) -> pathlib.Path | None:
    """The preset ``name`` of ``job``, or None when there is none."""
    path = PRESET_DIR / job / f"{name}.yaml"
    return path if path.is_file() else None
