"""The front door of the SOIR toolkit: one import for every stage (see docs/design.md §2)."""

from soir import __version__

__all__ = ["__version__"]
