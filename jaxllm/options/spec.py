"""A job's settings as one frozen dataclass, and the flags that come from it.

A job's config class lists its own settings as fields made by ``option(...)`` and takes the
shared ones as parts: fields whose type is itself a frozen dataclass (``run: Run = Run(...)``,
``optim: Optim = Optim(lr=2e-3)``), each shown as one ``--help`` section. Every leaf field is one
flag, ``--`` + its name with dashes (``batch_size`` -> ``--batch-size``), and one ``config.yaml``
key, the flag without its dashes. Flag names are unique across a job's parts, so the flags stay
flat as users type them. Defaults come from the class's default instance: a job sets its own
defaults for a shared part by giving that part's default instance.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable

# the sections of --help, in this order (one that is empty is not shown)
SECTIONS = ("model", "data", "optimiser", "evaluation", "generation", "run", "devices and memory", "multi-host")


def option(default: Any = None, help: str | None = None, *, type: Callable[[str], Any] | None = None,
           choices: typing.Sequence | None = None, metavar: str | None = None, many: bool = False,
           section: str | None = None, positional: bool = False, required: bool = False,
           exclusive: str | None = None, command_line_only: bool = False, flag: str | None = None,
           hidden: bool = False) -> Any:
    """A config field that is a flag. ``type`` turns the typed text into a checked value
    (``jaxllm.options.values``); a ``bool`` field with no ``type`` is a switch (off unless given);
    ``many``: one or more values (a tuple); ``section``: its ``--help`` section (default: its
    part's); ``positional``: a positional argument instead of a flag (``required`` or optional);
    ``exclusive``: the name of a group of fields of which the command line may give one
    (``--epochs``/``--steps``); ``command_line_only``: never read from or written to a config
    file; ``flag``: a flag name other than the field's; ``hidden``: left out of ``--help``."""
    return dataclasses.field(default=default, metadata={
        "help": help, "type": type, "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
        "many": many, "section": section, "positional": positional, "required": required, "exclusive": exclusive,
        "command_line_only": command_line_only or positional, "flag": flag, "hidden": hidden})


@dataclasses.dataclass(frozen=True)
class Flag:
    """One leaf field of a config: where it sits (``path``, e.g. ``("optim", "lr")``) and how it is given."""

    path: tuple[str, ...]
    default: Any
    help: str | None
    type: Callable[[str], Any] | None
    choices: tuple | None
    metavar: str | None
    many: bool
    switch: bool
    section: str
    positional: bool
    required: bool
    exclusive: str | None
    command_line_only: bool
    flag: str | None
    hidden: bool

    @property
    def dest(self) -> str:
        return self.path[-1]

    @property
    def key(self) -> str:
        """Its ``config.yaml`` key and, with ``--``, its flag: ``batch-size``."""
        return self.flag or self.dest.replace("_", "-")

    @property
    def name(self) -> str:
        return self.dest.upper() if self.positional else f"--{self.key}"

    def check(self, value: Any, source: str) -> Any:
        """``value`` from a config file (``source``), checked as the flag checks typed text; a
        ``ValueError`` naming the flag and the file otherwise."""
        import argparse

        where = f"argument {self.name} in {source}"
        if value is None:
            return None
        if self.switch:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: must be true or false, got {value!r}")
            return value
        if isinstance(value, list) != self.many:
            raise ValueError(f"{where}: must be {'a list' if self.many else 'one value'}, got {value!r}")
        items = value if self.many else [value]
        try:
            items = [self.type(str(v)) if self.type else str(v) for v in items]
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        for item in items:
            if self.choices is not None and item not in self.choices:
                raise ValueError(f"{where}: invalid choice: {item!r} (choose from {', '.join(map(str, self.choices))})")
        return tuple(items) if self.many else items[0]


def is_part(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def flags(cls: type) -> tuple[Flag, ...]:
    """Every flag of the config class ``cls``, parts walked in field order."""
    found = _walk(cls, cls(), (), getattr(cls, "SECTION", "run"), getattr(cls, "HELP", {}))
    names = [f.dest for f in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{cls.__name__}: flags defined twice: {', '.join(twice)}")
    return tuple(found)


def _walk(cls: type, defaults: Any, path: tuple[str, ...], section: str, helps: dict) -> list[Flag]:
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        value = getattr(defaults, field.name)
        if is_part(hints[field.name]):
            found += _walk(hints[field.name], value, (*path, field.name), hints[field.name].SECTION, helps)
            continue
        meta = field.metadata
        found.append(Flag(
            path=(*path, field.name), default=value, help=helps.get(field.name, meta.get("help")),
            type=meta.get("type"), choices=meta.get("choices"), metavar=meta.get("metavar"),
            many=meta.get("many", False), switch=hints[field.name] is bool and meta.get("type") is None,
            section=meta.get("section") or section, positional=meta.get("positional", False),
            required=meta.get("required", False), exclusive=meta.get("exclusive"),
            command_line_only=meta.get("command_line_only", False), flag=meta.get("flag"),
            hidden=meta.get("hidden", False)))
    return found


def build(cls: type, values: dict[str, Any]):
    """An instance of ``cls`` from ``{dest: value}`` (a value missing: the default); a part's own
    checks (its ``__post_init__``) raise ``ValueError``."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if is_part(hints[field.name]):
            kwargs[field.name] = build(hints[field.name], values)
        elif field.name in values:
            value = values[field.name]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def value_of(config: Any, flag: Flag) -> Any:
    for name in flag.path:
        config = getattr(config, name)
    return config


def file_values(config: Any) -> dict[str, Any]:
    """``{key: value}`` of every flag a config file holds: what ``config.yaml`` records of a run
    (plain YAML data: tuples as lists)."""
    values = {}
    for flag in flags(type(config)):
        if not flag.command_line_only and not flag.hidden:
            value = value_of(config, flag)
            values[flag.key] = list(value) if isinstance(value, tuple) else value
    return values
