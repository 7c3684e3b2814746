"""Every notebook executes top to bottom (nbclient) on small artifacts this test makes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from soirlab.cli import main

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def artifacts(quick_testbed, tmp_path_factory):
    root, data = tmp_path_factory.mktemp("notebook-inputs"), quick_testbed["data"]
    finetuned = str(quick_testbed["finetuned"])
    assert main(["shift", "--base", str(quick_testbed["base"]), "--finetuned", finetuned, "--out", str(root / "shift"), "--no-progress"]) == 0
    assert main(["rank", "--model", finetuned, "--forget", str(data / "forget.parquet"), "--retain", str(data / "retain.parquet"),
                 "--score", "grad-magnitude", "--out", str(root / "ranking"), "--no-progress"]) == 0
    assert main(["curves", "--model", finetuned, "--forget", str(data / "forget.parquet"), "--retain", str(data / "retain.parquet"),
                 "--by", "layer", "--steps", "2", "--eval-every", "1", "--lr", "1e-2", "--oracle", str(quick_testbed["root"] / "oracle"),
                 "--out", str(root / "curves"), "--no-progress"]) == 0
    rows = [{"score": score, "means": means, "sketch": sketch, "k": k, "seed": 0, "spearman": 1 - 1 / k if means == "sketched" else 1.0,
             "top10_overlap": 1.0, "ms_per_example": k / 100 if score == "soir-datainf" else None, "peak_rss_mb": 1.0, "sketch_mb": 1.0}
            for score, means in (("soir", "exact"), ("soir", "sketched"), ("soir-datainf", "sketched"))
            for sketch in ("gaussian", "sjlt") for k in (64, 256, 1024)]
    pd.DataFrame(rows).to_csv(root / "compression.csv", index=False)
    return {"SOIR_SHIFT": str(root / "shift"), "SOIR_RANKING": str(root / "ranking"), "SOIR_CURVES": str(root / "curves"),
            "SOIR_COMPRESSION": str(root / "compression.csv")}


@pytest.mark.parametrize("name", ["layer_robustness", "parameter_shift", "compression_tradeoff"])
def test_notebook_executes(name, artifacts, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for key, value in artifacts.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, f"{name} drew {len(images)} figures"
