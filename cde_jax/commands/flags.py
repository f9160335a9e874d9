"""Command-line flags generated from frozen config dataclasses: the config is the one source
of truth for a command's settings (flax's lm1b example), so a field added is a flag added.

Each field becomes `--field-name` (underscores as dashes), nested dataclass fields
(`TrainConfig.batch`, `.step`) flattened into the same namespace; the help and choices come
from the field's metadata (`config.setting`). Types come from the annotations: `int`,
`float`, `str`, optional ones (`int | None`: default None), `bool` (`--x` / `--no-x`) and
`tuple[str, ...]` (the flag repeated). A field without a default is a required flag.
Values are checked by the config itself (its `__post_init__`), not here: one check, one
message, whether the config comes from flags or from Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _fields(cls) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _base_type(annotation) -> tuple[type, bool]:
    """(the type a flag parses, whether None is allowed) of `X` or `X | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the dataclass `cls` (recursively)."""
    for field, annotation in _fields(cls):
        kind, _ = _base_type(annotation)
        if dataclasses.is_dataclass(kind):
            add_config_flags(parser, kind)
            continue
        required = field.default is dataclasses.MISSING
        kw = dict(help=field.metadata.get("help"), required=required, dest=field.name)
        if not required:
            kw["default"] = field.default
        if kind is bool:
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(kind) is tuple:
            kw.update(action="append", type=typing.get_args(kind)[0],
                      default=list(field.default))
        else:
            kw["type"] = kind
        if field.metadata.get("choices") is not None:
            kw["choices"] = field.metadata["choices"]
        parser.add_argument(flag(field.name), **kw)


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass `cls` built from the parsed flags of `add_config_flags(parser, cls)`."""
    values = {}
    for field, annotation in _fields(cls):
        kind, _ = _base_type(annotation)
        if dataclasses.is_dataclass(kind):
            values[field.name] = config_from_args(kind, args)
        else:
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
