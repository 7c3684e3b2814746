"""One registry per extension point (scores, sketches, curvature, objectives, optimizers, metrics, attacks).

A `Registry` maps a name to an entry and knows what kind of thing it holds, so an unknown
name is a one-line `UserError` listing the choices, and the command line takes its choices
and help from the registry instead of repeating them. Adding a component is one definition
plus one `register` call (or decorator); see docs/design.md §2.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from soir.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one extension point; `flag` is the command-line flag that picks one."""

    def __init__(self, kind: str, flag: str | None = None):
        self.kind, self.flag = kind, flag
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, entry: T | None = None, *, help: str = "", replace: bool = False):
        """Register `entry` under `name`; without `entry`, a decorator that registers what it decorates."""

        def add(value: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._entries[name] = value
            self._help[name] = help or first_line(getattr(value, "__doc__", None) or "")
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._help.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            flag = f" ({self.flag})" if self.flag else ""
            raise UserError(f"unknown {self.kind} {name!r}{flag}: use one of {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)


def first_line(text: str) -> str:
    """The first line of a docstring, without its full stop."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.rstrip(".")

