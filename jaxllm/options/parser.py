"""Command line -> config: ``parse(LmConfig, argv)`` returns the job's frozen config, or exits 2
with one line, ``error: argument --steps: must be >= 1, got 0 (see jaxllm train lm --help)``.

The defaults come, in this order, from the config class, the run's own ``config.yaml``
(``--resume``), the ``--config`` file or preset; flags on the command line override them all.
Parsing only reads: it starts nothing and writes nothing (``jaxllm.cli.start`` does that).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Any, Sequence, TypeVar

from jaxllm.options.parts import ONE_CPU_DEVICE
from jaxllm.options.spec import SECTIONS, Flag, build, flags
from jaxllm.training import run_flags

C = TypeVar("C")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors that suggest the closest flag or choice, and plain-text help
    (the docstrings' reStructuredText quotes dropped)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}{self._closest(message)} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        return super().format_help().replace("``", "").replace("`", "")

    def _closest(self, message: str) -> str:
        """`` (did you mean --steps?)`` for an unrecognized flag or invalid choice close to a known one."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = [c.strip().strip("'") for c in choice.group(2).split(",")]
            match = difflib.get_close_matches(choice.group(1), options, 1, 0.6)
            return f" (did you mean {match[0]}?)" if match else ""
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if not unknown:
            return ""
        known = sorted(set(re.findall(r"--[\w-]+", self.format_usage())))
        hints = [m[0] for arg in unknown.group(1).split() if arg.startswith("--")
                 if (m := difflib.get_close_matches(arg.split("=")[0], known, 1, 0.6))]
        return f" (did you mean {', '.join(hints)}?)" if hints else ""


def parser_for(cls: type, prog: str | None = None) -> ArgumentParser:
    """The argparse parser of the config class ``cls``: its docstring (or ``DESCRIPTION``) as the
    description, one ``--help`` section per part, every flag's default after its help."""
    parser = ArgumentParser(prog=prog, description=getattr(cls, "DESCRIPTION", None) or cls.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sections = {title: parser.add_argument_group(title) for title in SECTIONS}
    exclusive = {}
    for flag in flags(cls):
        group = sections[flag.section]
        if flag.exclusive:
            if flag.exclusive not in exclusive:
                exclusive[flag.exclusive] = group.add_mutually_exclusive_group()
            group = exclusive[flag.exclusive]
        kwargs = {"help": argparse.SUPPRESS if flag.hidden else _help(cls, flag), "default": flag.default}
        if flag.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=flag.type, choices=flag.choices, metavar=flag.metavar,
                          nargs=_nargs(flag))
        if flag.positional:
            group.add_argument(flag.dest, **kwargs)
        else:
            group.add_argument(flag.name, dest=flag.dest, **kwargs)
    return parser


def _nargs(flag: Flag) -> str | None:
    if flag.positional and not flag.required:
        return "*" if flag.many else "?"
    return "+" if flag.many else None


def _help(cls: type, flag: Flag) -> str:
    text = (flag.help or "").replace("%", "%%")
    if flag.dest == "cpu_devices" and not getattr(cls, "SPLIT_CPU", True):
        text = ONE_CPU_DEVICE.replace("%", "%%")
    if flag.dest == "config":
        presets = run_flags.presets(preset_job(cls)) if preset_job(cls) else []
        text += f"; or a preset: {', '.join(presets)}" if presets else ""
    if flag.switch or flag.required or "(default" in text:
        return text
    default = flag.default
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def parse(cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None) -> C:
    """The config of ``cls`` that ``argv`` (default: ``sys.argv[1:]``) asks for; exits 2 with one
    ``error:`` line on a bad flag, value, file or combination."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser_for(cls, prog)
    known = {f.dest for f in flags(cls)}
    if "config" in known:  # a training job: config files give defaults
        try:
            parser.set_defaults(**file_defaults(cls, parser, argv))
        except ValueError as exc:
            parser.error(str(exc))
    values = vars(parser.parse_args(argv))
    try:
        return build(cls, values)
    except ValueError as exc:  # a part's own check of values that only make sense together
        parser.error(str(exc))


_UNSET = object()


def given(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str]) -> dict[str, Any]:
    """``{dest: value}`` of the flags the command line itself gives: a parse whose defaults are all a marker."""
    marked = argparse.Namespace(**{f.dest: _UNSET for f in flags(cls)})
    parsed, _ = parser.parse_known_args(argv, marked)
    return {k: v for k, v in vars(parsed).items() if v is not _UNSET}


def file_defaults(cls: type, parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """``{dest: value}`` from the ``config.yaml`` of ``--init-from``'s run (only the keys of the
    model it starts from: ``cls.INHERITED``), then of the run itself (``--resume``), then from
    ``--config``, each over the one before; a bad
    file, key or value is a ``ValueError`` naming it. Where the command line gives one of
    exclusive flags (``--epochs``/``--steps``), the files' others are dropped."""
    from_command_line = given(parser, cls, argv)
    sources = []
    if from_command_line.get("init_from") is not None:  # the other run's model, below every other source
        saved = os.path.join(from_command_line["init_from"], run_flags.CONFIG_FILE)
        if os.path.isfile(saved):
            sources.append((saved, saved, cls.INHERITED))
    if from_command_line.get("resume"):
        out = from_command_line.get("out", parser.get_default("out"))
        saved = os.path.join(out, run_flags.CONFIG_FILE)
        if os.path.isfile(saved):
            sources.append((saved, saved, None))
    if from_command_line.get("config") is not None:
        name = from_command_line["config"]
        sources.append((f"--config {name}", config_path(cls, name), None))
    defaults = {}
    for source, path, keys in sources:
        try:
            values = run_flags.read_flags(path)
        except ValueError as exc:
            raise ValueError(f"argument --config: {exc}" if source != path else str(exc)) from None
        if keys is not None:
            values = {k: v for k, v in values.items() if k in keys}
        defaults.update(check_file(cls, values, source))
    for flag in flags(cls):
        if flag.exclusive and flag.dest not in from_command_line and any(
                f.exclusive == flag.exclusive and f.dest in from_command_line for f in flags(cls)):
            defaults.pop(flag.dest, None)
    return defaults


def preset_job(cls: type) -> str | None:
    """The job whose presets ``--config NAME`` names: ``PRESET_JOB`` (a job that trains another
    job's model, such as ``jaxllm compare lm``), else the job itself."""
    return getattr(cls, "PRESET_JOB", None) or getattr(cls, "JOB", None)


def config_path(cls: type, value: str) -> str:
    """``--config``'s file: a path, or the bare name of one of the job's presets."""
    if os.path.exists(value):
        return value
    job = preset_job(cls)
    preset = run_flags.preset_path(job, value) if job and os.sep not in value else None
    if preset is None:
        names = run_flags.presets(job) if job else []
        close = difflib.get_close_matches(value, names, 1, 0.6)
        presets = (f" and no such preset (presets: {', '.join(names)}){f' (did you mean {close[0]}?)' if close else ''}"
                   if names else "")
        raise ValueError(f"argument --config: no file {value!r}{presets}")
    return os.fspath(preset)


def check_file(cls: type, values: dict, source: str) -> dict[str, Any]:
    """``{dest: value}`` for a file's ``{key: value}``, each value checked as its flag checks typed text."""
    keys = {f.key: f for f in flags(cls) if not f.positional and not f.hidden}
    allowed = {k: f for k, f in keys.items() if not f.command_line_only}
    unknown = [k for k in values if k not in allowed]
    if unknown:
        only = [k for k in unknown if k in keys]
        hints = [f"{k} -> {m[0]}" for k in unknown if k not in only
                 if (m := difflib.get_close_matches(k.replace("_", "-"), allowed, 1))]
        raise ValueError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                         + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                         + (f" ({', '.join(only)}: command line only)" if only else ""))
    return {allowed[k].dest: allowed[k].check(v, source) for k, v in values.items()}
