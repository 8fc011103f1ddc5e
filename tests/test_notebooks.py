"""The notebooks are stored without outputs and run headless on small settings (nbclient)."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_the_three_walkthroughs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_datasets.ipynb", "03_compare_runs.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: stored with outputs"
            assert "sys.path" not in cell.source and "from tests" not in cell.source  # imports histoseg only
    assert "SMALL" in nb.cells[1].source  # parameters at the top


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_on_small_settings(path: Path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # the kernel inherits the environment: small settings, outputs in tmp, this checkout's histoseg
    monkeypatch.setenv("HISTOSEG_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HISTOSEG_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("HISTOSEG_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("HISTOSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if path.stem == "01_quickstart":
        assert (tmp_path / "01_quickstart" / "per_image.csv").is_file() and "val/dice" in text
    if path.stem == "03_compare_runs":
        sweep = tmp_path / "03_compare_runs" / "synthetic_optuna"
        assert (sweep / "optuna.db").is_file() and "wandb sync" in text
        assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 2
