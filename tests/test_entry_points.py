"""The entry points load torch and lightning only when a task runs: ``--help`` and ``--cfg job`` (how a sweep's
overrides are checked before launching it) answer without the multi-second import."""
from __future__ import annotations

import subprocess
import sys

import yaml

from tests.conftest import ROOT

HEAVY = ("torch", "lightning", "segmentation_models_pytorch", "albumentations")


def run_py(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_error_reporting_every_entry_point_wraps_itself_in_imports_without_torch():
    r = run_py(f"import sys, histoseg.tasks.utils, histoseg.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_cfg_job_prints_the_composed_config_without_loading_torch():
    """``train.py`` and ``histoseg-train`` compose the config and print it; nothing heavy was imported."""
    probe = (
        "import atexit, runpy, sys\n"
        f"atexit.register(lambda: sys.stderr.write('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules)))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0].endswith('.py') else "
        "__import__('histoseg.cli', fromlist=['x']).train_main()\n"
    )
    for entry in ("train.py", "histoseg-train"):
        r = run_py(probe, entry, "--cfg", "job", "experiment=monuseg_instance", "seed=7")
        assert r.returncode == 0, r.stderr[-2000:]
        job = yaml.safe_load(r.stdout)
        assert job["seed"] == 7 and job["dataset"]["name"] == "monuseg" and job["model"]["heads"]
        assert r.stderr.rstrip().endswith("HEAVY="), f"{entry}: {r.stderr[-500:]}"
