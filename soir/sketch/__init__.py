"""Gradient sketches (docs/design.md §6): seeded random maps that keep inner products.

- `maps`: the maps and their registry `SKETCHES` (none, gaussian, rademacher, sjlt, oporp, factored);
- `factored`: `FactoredSketcher`, per-example Kronecker sketches of weight matrices from hooks;
- `plan`: `GroupSketch` / `SketchPlan`, sketching every parameter group of a model at once, and
  `span_coordinates`, the exact low-dimensional form of a few full gradients (the mean gradients);
- `storage`: sketches on disk (safetensors + manifest).
"""

from soir.sketch.factored import (
    FactoredSketcher,
    conv1d_type,
    matrix_layouts,
    matrix_modules,
)
from soir.sketch.maps import (
    SKETCHES,
    DenseSketch,
    GaussianSketch,
    IdentitySketch,
    KroneckerSketch,
    OPORPSketch,
    PaddedIdentity,
    RademacherSketch,
    SJLTSketch,
    Sketch,
    factor_pair,
    make_sketch,
    map_seed,
)
from soir.sketch.plan import (
    GroupSketch,
    SketchPlan,
    flat_member,
    gather_examples,
    gram_factor,
    param_names,
    span_coordinates,
)
from soir.sketch.storage import MANIFEST_FILE, SKETCH_FILE, load_sketches, save_sketches

__all__ = [
    "SKETCHES", "DenseSketch", "FactoredSketcher", "GaussianSketch", "GroupSketch", "IdentitySketch", "KroneckerSketch",
    "MANIFEST_FILE", "OPORPSketch", "PaddedIdentity", "RademacherSketch", "SJLTSketch", "SKETCH_FILE", "Sketch", "SketchPlan",
    "conv1d_type", "factor_pair", "flat_member", "gather_examples", "gram_factor", "load_sketches", "make_sketch", "map_seed",
    "matrix_layouts", "matrix_modules", "param_names", "save_sketches", "span_coordinates",
]
