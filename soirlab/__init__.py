"""The SOIR toolkit in one import: every stage as a function over loaded objects or paths.

    import soirlab as sl

    model, tokenizer = sl.load_model("finetuned")            # a save_pretrained directory (or "tiny:olmo", tokenizer=...)
    splits = sl.load_splits("testbed/data")                  # {"forget": DataFrame, "retain": ..., "holdout": ..., ...}
    ranking = sl.rank(model, splits["forget"], splits["retain"], tokenizer=tokenizer, score="soir")
    mask = sl.select(ranking, model, top=0.1, by="params")
    model, result = sl.unlearn(model, splits["forget"], splits["retain"], tokenizer=tokenizer, mask=mask,
                               objective="graddiff", w_retain=5, lr=1e-2, steps=100, eval_every=20, copy=True)
    metrics, per_example = sl.evaluate(model, tokenizer, splits)
    shift = sl.shift("base", "finetuned")                    # streamed tensor by tensor from safetensors
    curves = sl.curves(model, splits["forget"], splits["retain"], tokenizer=tokenizer, by="layer", steps=30, lr=1e-2)
    agreement = sl.compare({"soir": ranking, "random": "rankings/random"})

Each function takes what the `soir` command reads from disk, already in memory (a model,
DataFrames, a `Ranking`, a `Mask`) or as paths, and returns the artifact the command writes
(`Ranking`, `Mask`, metrics and tables); keyword options are fields of the stage's settings
dataclass. `load_ranking`, `load_mask`, `load_curves` and `read_shift` read what the commands wrote, and
`plots` draws the figures they save. The command line (`soirlab.cli`) is a thin
layer over the same stage functions. See docs/design.md.
"""

import importlib

from soir import __version__

# name -> the module it comes from; imported on first use, so `soir --help` (soirlab.cli) stays light
_EXPORTS = {
    **dict.fromkeys(("compare", "curves", "evaluate", "load_model", "load_splits", "rank", "select", "shift", "unlearn"), "soirlab.api"),
    "Curves": "analysis.curves", "load_curves": "analysis.curves", "robustness": "analysis.curves", "read_shift": "analysis.shift", "DataSettings": "soir.data",
    "Mask": "soir.mask", "load_mask": "soir.mask:load", "Ranking": "soir.ranking", "RankSettings": "soir.ranking",
    "load_ranking": "soir.ranking:load", "SelectSettings": "soir.select",
}
_MODULES = {"plots": "analysis.plots"}
__all__ = ["__version__", *sorted(_EXPORTS), *_MODULES]


def __getattr__(name: str):
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        module, _, attribute = _EXPORTS[name].partition(":")
        value = getattr(importlib.import_module(module), attribute or name)
    else:
        raise AttributeError(f"module 'soirlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
