"""experiments/batch.py: presets x seeds run N at a time, with a deadline, a batch.json summary and a tarball."""
import json
import os
import sys
import tarfile
import time

import pytest

from tests.helpers_scripts import load_experiment_script

batch = load_experiment_script("batch")


def test_a_preset_run_lands_where_collect_reads_it_and_packs_without_checkpoints(tmp_path, capsys):
    root, out = tmp_path / "runs", tmp_path / "back" / "runs.tar.gz"
    rc = batch.main(["synthetic_quick", "--seeds", "3", "--root", str(root), "--set", "trainer=debug",
                     "--pack", str(out)])
    assert rc == 0
    summary = json.loads((root / "batch.json").read_text())
    (job,) = summary["jobs"]
    assert job["name"] == "synthetic_quick/seed_3" and job["status"] == "ok" and job["returncode"] == 0
    assert 0.0 <= job["metrics"]["dice"] <= 1.0 and "aji" in job["metrics"]
    assert job["cmd"] == f"python train.py experiment=synthetic_quick seed=3 hydra.run.dir={root}/synthetic_quick/seed_3 trainer=debug"
    # the seed's run folder, as experiments/collect.py expects
    assert "seed: 3" in (root / "synthetic_quick" / "seed_3" / "config.yaml").read_text()
    assert list(root.rglob("*.ckpt")), "the run keeps its checkpoints on disk"
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert {"runs/batch.json", "runs/synthetic_quick/seed_3/summary.json", "runs/synthetic_quick/seed_3.log"} <= set(names)
    assert not [n for n in names if n.endswith(".ckpt")]
    assert not out.with_name(out.name + ".part").exists()
    table = capsys.readouterr().out
    assert "synthetic_quick/seed_3" in table and "dice=" in table


def test_jobs_run_side_by_side_up_to_parallel(tmp_path):
    code = "import time; time.sleep(1.5)"
    jobs = [batch.Job(name=f"j{i}", cmd=[sys.executable, "-c", code], log=tmp_path / f"j{i}.log") for i in range(3)]
    batch.run_jobs(jobs, parallel=2, poll_s=0.05, echo=lambda line: None)
    assert [j.status for j in jobs] == ["ok"] * 3
    first, second, third = (j.started for j in jobs)
    assert second < first + jobs[0].wall_s  # the second started while the first ran
    assert third >= min(first + jobs[0].wall_s, second + jobs[1].wall_s) - 0.2  # the third waited for a slot


def test_a_failing_job_is_reported_with_its_log_and_fails_the_batch(tmp_path, capsys, monkeypatch):
    """main() with one job that fails (a stand-in command, so no second trainer starts): exit 1, the failure in
    batch.json, the log named and its tail shown, the good job still scored."""
    real = batch.make_jobs

    def one_good_one_bad(experiments, seeds, root, overrides):
        good = real(experiments, seeds, root, overrides)[0]
        good.cmd = [sys.executable, "-c", "print('fine')"]
        bad = batch.Job(name="broken/seed_0", log=root / "broken" / "seed_0.log", run_dir=root / "broken" / "seed_0",
                        cmd=[sys.executable, "-c", "import sys; print('Could not load model/no_such_model'); sys.exit(2)"])
        return [good, bad]

    monkeypatch.setattr(batch, "make_jobs", one_good_one_bad)
    root = tmp_path / "runs"
    assert batch.main(["synthetic_quick", "--root", str(root)]) == 1
    jobs = json.loads((root / "batch.json").read_text())["jobs"]
    assert [(j["status"], j["returncode"]) for j in jobs] == [("ok", 0), ("failed", 2)]
    assert jobs[1]["metrics"] == {}
    printed = capsys.readouterr().out
    assert str(root / "broken" / "seed_0.log") in printed and "no_such_model" in printed


def test_deadline_stops_the_running_jobs_with_their_children_and_skips_the_rest(tmp_path):
    # jobs that start a child (as a data-loader worker would) and then outlive any sane deadline; the two
    # running ones are stopped together (one shared grace period), the third never starts
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "open({pidfile!r}, 'w').write(str(c.pid)); time.sleep(600)")
    jobs = [batch.Job(name=f"sleep{i}", cmd=[sys.executable, "-c", code.format(pidfile=str(tmp_path / f"child{i}.pid"))],
                      log=tmp_path / f"sleep{i}.log") for i in range(3)]
    lines = []
    batch.run_jobs(jobs, parallel=2, deadline_s=3, poll_s=0.1, grace_s=2, echo=lines.append)
    assert [j.status for j in jobs] == ["timeout", "timeout", "not_started"]
    assert jobs[0].returncode is not None and jobs[1].returncode is not None and jobs[2].proc is None
    for i in range(2):
        child = int((tmp_path / f"child{i}.pid").read_text())
        for _ in range(50):  # the grandchild was in the job's process group: it is gone too
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"child process {child} outlived the deadline")
    assert any("deadline" in line for line in lines)


def test_exit_status_of_each_job_is_kept(tmp_path):
    jobs = [batch.Job(name="ok", cmd=[sys.executable, "-c", "print('fine')"], log=tmp_path / "ok.log"),
            batch.Job(name="bad", cmd=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                      log=tmp_path / "bad.log")]
    lines = []
    batch.run_jobs(jobs, parallel=2, poll_s=0.05, echo=lines.append)
    assert [(j.status, j.returncode) for j in jobs] == [("ok", 0), ("failed", 3)]
    assert "boom" in "\n".join(lines)  # the failing job's log tail is shown
    assert (tmp_path / "ok.log").read_text().strip() == "fine"


def test_dry_run_and_unknown_preset(tmp_path, capsys):
    assert batch.main(["nuclei_instance", "brecahad_strong", "--seeds", "0", "2", "--dry-run",
                       "--root", str(tmp_path), "--set", "trainer=gpu"]) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 4 and all(c.endswith("trainer=gpu") for c in cmds)
    assert f"experiment=brecahad_strong seed=2 hydra.run.dir={tmp_path}/brecahad_strong/seed_2" in cmds[3]
    assert not (tmp_path / "batch.json").exists()
    with pytest.raises(SystemExit):
        batch.main(["no_such_preset", "--dry-run"])
    assert "no_such_preset" in capsys.readouterr().err


def test_torch_threads_share_the_cores_among_the_jobs_that_run_at_once(tmp_path, monkeypatch):
    """cores / min(--parallel, jobs): one job with --parallel 2 still gets every core; an OMP_NUM_THREADS the
    user set wins."""
    seen = []
    monkeypatch.setattr(batch, "available_cores", lambda: 4)
    monkeypatch.setattr(batch, "run_jobs", lambda jobs, env=None, **kw: seen.append(env["OMP_NUM_THREADS"]) or jobs)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for seeds, expected in ((["0"], "4"), (["0", "1"], "2"), (["0", "1", "2"], "2")):
        batch.main(["synthetic_quick", "--seeds", *seeds, "--parallel", "2", "--root", str(tmp_path / "r")])
        assert seen.pop() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    batch.main(["synthetic_quick", "--seeds", "0", "--parallel", "2", "--root", str(tmp_path / "r")])
    assert seen.pop() == "3"


def test_parallel_below_one_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        batch.main(["synthetic_quick", "--parallel", "0", "--root", str(tmp_path)])
    assert e.value.code == 2 and "--parallel must be >= 1" in capsys.readouterr().err
