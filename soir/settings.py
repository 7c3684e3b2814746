"""Settings dataclasses whose fields carry their own command-line help.

A settings field declared with `setting(default, "what it is")` is a plain dataclass field
that also knows its help text (and its choices: a list, or a `Registry` whose names and
help become the choices). `add_settings(parser, Settings, names)` adds one flag per field
(`--max-new-tokens` for `max_new_tokens`, type and default from the field), and
`from_args(Settings, args, names)` builds the settings back from the parsed flags, so the
help, the default and the settings never disagree and no default is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence

from soir.registry import Registry

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, help: str = "", *, factory=None, choices=None, minimum=None, metavar: str | None = None) -> Any:
    """A dataclass field with its command-line help; `choices` is a list or a `Registry`, `minimum`
    the smallest value allowed (both checked by `check_fields`)."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(settings, prefix: str = "") -> None:
    """A one-line UserError for the first field of `settings` outside its declared `choices` or below
    its `minimum` (None values are left to the settings' own meaning of unset); `prefix` as in
    `add_settings`, so the message names the flag the user typed."""
    from soir.errors import UserError

    for field in dataclasses.fields(settings):
        value, choices, minimum = getattr(settings, field.name), field.metadata.get("choices"), field.metadata.get("minimum")
        if value is None:
            continue
        flag = flag_name(f"{prefix}_{field.name}" if prefix else field.name)
        if choices is not None and value not in choices:
            listed = choices.names() if isinstance(choices, Registry) else list(choices)
            raise UserError(f"unknown {flag} {value!r}: use one of {', '.join(map(str, listed))}")
        if minimum is not None and value < minimum:
            raise UserError(f"{flag} must be at least {minimum}, got {value}")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None


def _plain(hint) -> tuple[Any, bool]:
    """(the type a flag parses, whether None is allowed) of a field's annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def add_settings(parser, cls, names: Sequence[str], *, required: Sequence[str] = (), defaults: dict | None = None, group: str | None = None,
                 prefix: str = "", unset: Sequence[str] = ()) -> None:
    """One flag per named field of the settings dataclass `cls` (help, type, choices and default from the field).

    `defaults` overrides a field's default for this command only; `required` flags have none;
    `unset` flags parse to None when not given (so a handler can tell), their help still showing
    the field's default; `prefix` names the flags `--PREFIX-NAME` (dest `PREFIX_NAME`).
    """
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        field = by_name[name]
        meta = field.metadata
        default = (defaults or {}).get(name, field_default(field))
        kind, optional = _plain(hints[name])
        help_text = meta.get("help", "")
        choices = meta.get("choices")
        options: dict[str, Any] = {}
        if isinstance(choices, Registry):
            help_text = f"{help_text}: {describe_choices(choices)}" if help_text else describe_choices(choices)
            options["choices"] = choices.names()
        elif choices is not None:
            options["choices"] = list(choices)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(kind) is tuple:
            item, *rest = typing.get_args(kind)
            options.update(nargs="+" if rest == [Ellipsis] else len(typing.get_args(kind)), type=item)
            if rest == [Ellipsis]:
                options["action"] = "extend"
            default = list(default) if default is not None else None
        else:
            options["type"] = kind
        if meta.get("metavar"):
            options["metavar"] = meta["metavar"]
        shown = "" if kind is bool or default is None or default == [] or name in required else f" (default: {_show(default)})"
        value = None if name in required or name in unset else ([] if default == [] else default)
        target.add_argument(flag_name(f"{prefix}_{name}" if prefix else name), default=value, required=name in required,
                            help=(help_text + shown).replace("%", "%%"), **options)


def describe_choices(registry: Registry, names: Sequence[str] | None = None) -> str:
    """'name (what it is); name (…)' of a registry's entries, for a --help text."""
    names = registry.names() if names is None else names
    return "; ".join(f"{n} ({registry.help(n)})" if registry.help(n) else n for n in names)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def from_args(cls, args, names: Sequence[str], **given):
    """`cls(**given, **{name: args.name})`: settings from the flags `add_settings` added."""
    values = {}
    for name in names:
        value = getattr(args, name)
        values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values, **given)
