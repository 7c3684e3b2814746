"""Command-line flags shared by several subcommands, defined once, from the settings they stand for.

Each `add_*` function adds one group of flags to an argparse parser (help, type and default
from the settings fields: `soir.settings.add_settings`); each `*_settings` function turns the
parsed flags back into those settings. Flag names mean the same on every subcommand
(docs/design.md §11).
"""

from __future__ import annotations

from soir.data import DataSettings, parse_column_map
from soir.errors import UserError
from soir.models import ModelSettings, TinySize
from soir.settings import add_settings, from_args

MODEL_FLAGS = ("model", "tokenizer", "device", "dtype")
TINY_FLAGS = ("hidden", "layers", "heads", "intermediate")
DATA_FLAGS = ("template", "max_length")
SELECT_FLAGS = ("top", "by", "per_kind", "offset", "bottom", "include", "exclude")


def add_common(parser, out_help: str) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help=out_help)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_progress(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_model(parser, dtype: str | None = None, required: bool = True) -> None:
    add_settings(parser, ModelSettings, MODEL_FLAGS, required=("model",) if required else (), defaults={"dtype": dtype})


def add_tiny(parser) -> None:
    add_settings(parser, TinySize, TINY_FLAGS, group="tiny models (tiny:ARCH only)")


def model_settings(args, dtype: str | None = None) -> ModelSettings:
    """The model flags (and the tiny-model flags, where the subcommand has them) as settings."""
    size = from_args(TinySize, args, TINY_FLAGS) if hasattr(args, "hidden") else TinySize()
    return ModelSettings(model=str(args.model), tokenizer=args.tokenizer, dtype=args.dtype or dtype, device=args.device, size=size)


def add_data(parser) -> None:
    add_settings(parser, DataSettings, DATA_FLAGS)
    parser.add_argument("--columns", metavar="SRC=DST,…", help="rename columns on reading, e.g. question=input,answer=output for TOFU-style files")


def data_settings(args) -> DataSettings:
    return from_args(DataSettings, args, DATA_FLAGS, columns=parse_column_map(args.columns) or None)


def add_selection(parser, with_ranking: bool) -> None:
    """How a mask is taken from a ranking: shared by `select` and `unlearn` (there, with --ranking)."""
    from soir.select import SelectSettings

    add_settings(parser, SelectSettings, SELECT_FLAGS, required=() if with_ranking else ("top",), defaults={"top": None} if with_ranking else None)


def selection_settings(args):
    """The selection flags as `soir.select.SelectSettings`."""
    from soir.select import SelectSettings

    return from_args(SelectSettings, args, SELECT_FLAGS)


def named_files(items: list[str], flag: str = "--eval") -> dict[str, list[str]]:
    """`forget=a.parquet retain=b.parquet` -> {"forget": ["a.parquet"], "retain": ["b.parquet"]}."""
    named: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"bad {flag} item {item!r}: write NAME=FILE, e.g. forget=forget.parquet")
        named.setdefault(name, []).append(path)
    return named
