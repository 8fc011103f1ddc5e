"""Bad input ends a command with its one-line message, not Hydra's tracebacks (a bug still shows its traceback)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.data.io import DataError
from histoseg.tasks.utils import ConfigError, report_user_errors

ROOT = Path(__file__).resolve().parents[1]


def test_outside_a_hydra_run_every_error_propagates_unchanged():
    """Called directly (tests, notebooks, a multirun's job runner) the wrapper changes nothing."""
    for exc in (ConfigError("bad option"), DataError("x.png: unreadable"), FileNotFoundError("y"), RuntimeError("bug")):
        def fail(cfg, exc=exc):
            raise exc

        with pytest.raises(type(exc), match=str(exc)):
            report_user_errors(fail)(None)


@pytest.mark.slow  # two fresh interpreters importing torch + lightning: ~20 s
def test_train_with_a_missing_data_folder_prints_one_error_line_and_exits_1(tmp_path):
    nowhere = tmp_path / "nowhere"
    cmd = [sys.executable, "train.py", "dataset=monuseg", "trainer=debug", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "HISTOSEG_DATA": str(nowhere)}
    env.pop("HYDRA_FULL_ERROR", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"error: {nowhere}/monuseg: data folder for 'monuseg' not found" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    # the run's own log keeps the message, and the traceback in case the message is not enough
    run_log = (tmp_path / "run" / "train.log").read_text()
    assert f"run failed: {nowhere}/monuseg" in run_log
    assert "traceback of the error above" in run_log and "Traceback" in run_log and "DataError" in run_log
    # HYDRA_FULL_ERROR=1 asks for the whole trace, as Hydra documents
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" in r.stderr and "DataError" in r.stderr
