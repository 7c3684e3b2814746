"""SOIR core: data, models, parameter groups, gradients, sketches, curvature, scores, ranking, masks.

This package never imports `unlearn` or `analysis` (docs/design.md §2); the command-line
dispatcher in `soir.cli` is the one place that knows all three, and imports them lazily.
"""

__version__ = "0.1.0"
