"""experiments/monuseg_instance_pseudo/pipeline.py: the two-stage MoNuSeg recipe (teacher -> maps -> pseudo maps ->
students -> TCIA crops) as one resumable command. The stages' own code is tested elsewhere (training, eval save_maps,
make_pseudo); here: which command each stage runs with which overrides, the order, skipping finished stages, the
deadline and the teacher's checkpoint choice, with the runner replaced by a recorder."""
import json

import pytest

from tests.helpers_scripts import load_experiment_script

pl = load_experiment_script("monuseg_instance_pseudo/pipeline")


def fake_run(run, names=("epoch_011.ckpt", "last.ckpt")):
    """What a training run leaves for the next stage: its checkpoints."""
    ck = run / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    for n in names:
        (ck / n).write_bytes(b"x")
    return ck


def fake_teacher(root, seed=0, names=("epoch_011.ckpt", "last.ckpt")):
    return fake_run(root / "teacher" / "monuseg_instance" / f"seed_{seed}", names)


def recorder(ran, fail=(), threads=None):
    """A stand-in for batch.run_jobs: records (job, parallel) and each job's torch threads, leaves checkpoints
    where training would."""
    def run_jobs(jobs, parallel=1, deadline_s=None, env=None, echo=print):
        for j in jobs:
            ran.append((j.name, parallel))
            if threads is not None:
                threads[("teacher " if "teacher" in j.log.parts else "") + j.name] = env["OMP_NUM_THREADS"]
            if j.name.startswith("monuseg_instance/"):
                fake_run(j.run_dir)
            j.status = "failed" if j.name in fail else "ok"
        return jobs
    return run_jobs


def test_teacher_checkpoint_is_the_selected_epoch_then_last_then_a_clear_error(tmp_path):
    ck = fake_teacher(tmp_path, names=("epoch_003.ckpt", "epoch_011.ckpt", "last.ckpt"))
    run = ck.parent
    assert pl.selected_checkpoint(run) == ck / "epoch_011.ckpt"
    for n in ("epoch_003.ckpt", "epoch_011.ckpt"):
        (ck / n).unlink()
    assert pl.selected_checkpoint(run) == ck / "last.ckpt"
    (ck / "last.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="the run left no checkpoint"):
        pl.selected_checkpoint(run)


def test_each_stage_gets_its_own_overrides(tmp_path):
    a = pl.parse(["--root", str(tmp_path), "--teacher-seed", "4", "--seeds", "0", "2",
                  "--set", "trainer=gpu", "dataset.num_workers=4", "--eval-set", "trainer=gpu", "inference.tta=none",
                  "--data-root", str(tmp_path / "monuseg")])
    ck = fake_teacher(tmp_path, seed=4)
    students = [fake_run(tmp_path / "monuseg_instance" / f"seed_{s}", ("epoch_009.ckpt",)) for s in (0, 2)]
    shown = {s: [j.shown for j in pl.stage_jobs(s, a, tmp_path)] for s in pl.STAGES}
    assert shown["teacher"] == [f"python train.py experiment=monuseg_instance seed=4 hydra.run.dir={tmp_path}/teacher/"
                                f"monuseg_instance/seed_4 trainer=gpu dataset.num_workers=4 test=false"]
    assert [s.split()[3] for s in shown["maps"]] == ["split=train", "split=val"]
    assert all(f"ckpt_path={ck / 'epoch_011.ckpt'}" in s and s.endswith("trainer=gpu inference.tta=none")
               and "num_workers" not in s and "save_maps=true" in s for s in shown["maps"])
    assert f"--data-root {tmp_path / 'monuseg'}" in shown["pseudo"][0]
    assert f"--maps {tmp_path}/teacher_train {tmp_path}/teacher_val" in shown["pseudo"][0]
    assert len(shown["students"]) == 2
    for seed, s in zip((0, 2), shown["students"]):
        assert f"seed={seed} " in s and f"dataset.reader.instances_dir={tmp_path}/instances" in s
        assert s.endswith("trainer=gpu dataset.num_workers=4") and "test=false" not in s and "tta" not in s
    # each student's own selected checkpoint on every TCIA crop, with the evaluation overrides
    assert shown["tcia"] == [f"histoseg-eval ckpt_path={ck / 'epoch_009.ckpt'} dataset=tcia_nuclei split=all "
                             f"hydra.run.dir={tmp_path}/tcia_seed_{seed} trainer=gpu inference.tta=none"
                             for seed, ck in zip((0, 2), students)]


def test_stages_run_in_order_skip_what_is_done_and_stop_at_a_failure(tmp_path, monkeypatch):
    (tmp_path / "monuseg" / "train").mkdir(parents=True)
    root = tmp_path / "r"
    base = ["--root", str(root), "--data-root", str(tmp_path / "monuseg"), "--seeds", "0", "1", "--parallel", "2"]
    ran = []
    monkeypatch.setattr(pl.batch, "run_jobs", recorder(ran, fail={"pseudo"}))
    assert pl.main(base) == 1
    assert ran == [("monuseg_instance/seed_0", 1), ("maps/train", 2), ("maps/val", 2), ("pseudo", 1)]
    state = json.loads((root / "pipeline.json").read_text())
    assert [state[s]["status"] for s in ("teacher", "maps", "pseudo")] == ["ok", "ok", "failed"]
    assert "students" not in state
    # the rerun resumes at the failed stage
    ran.clear()
    monkeypatch.setattr(pl.batch, "run_jobs", recorder(ran))
    assert pl.main(base) == 0
    assert ran == [("pseudo", 1), ("monuseg_instance/seed_0", 2), ("monuseg_instance/seed_1", 2),
                   ("tcia/seed_0", 2), ("tcia/seed_1", 2)]
    # --force reruns a finished stage; nothing else
    ran.clear()
    assert pl.main([*base, "--force", "maps"]) == 0
    assert [n for n, _ in ran] == ["maps/train", "maps/val"]


def test_a_deadline_already_spent_starts_nothing_and_exits_1(tmp_path, monkeypatch, capsys):
    (tmp_path / "monuseg" / "train").mkdir(parents=True)
    monkeypatch.setattr(pl.batch, "run_jobs", lambda *a, **k: pytest.fail("nothing may start"))
    assert pl.main(["--root", str(tmp_path / "r"), "--data-root", str(tmp_path / "monuseg"), "--deadline-s", "0"]) == 1
    assert "teacher: not started (deadline)" in capsys.readouterr().out


def test_a_missing_data_folder_is_named_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pl.batch, "run_jobs", lambda *a, **k: pytest.fail("nothing may start"))
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nowhere'}: no MoNuSeg 'train' folder"):
        pl.main(["--root", str(tmp_path / "r"), "--data-root", str(tmp_path / "nowhere")])


def test_a_rerun_keeps_the_students_already_tested(tmp_path, monkeypatch):
    """A deadline that stopped the students stage: the seeds whose test finished (summary.json) are not trained
    again; ``--force students`` trains them all."""
    (tmp_path / "monuseg" / "train").mkdir(parents=True)
    root = tmp_path / "r"
    root.mkdir()
    (root / "pipeline.json").write_text(json.dumps({s: {"status": "ok"} for s in ("teacher", "maps", "pseudo")}))
    done = root / "monuseg_instance" / "seed_1"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    fake_run(done)
    ran = []
    monkeypatch.setattr(pl.batch, "run_jobs", recorder(ran))
    base = ["--root", str(root), "--data-root", str(tmp_path / "monuseg"), "--seeds", "0", "1", "2"]
    assert pl.main(base) == 0
    assert [n for n, _ in ran] == ["monuseg_instance/seed_0", "monuseg_instance/seed_2",
                                   "tcia/seed_0", "tcia/seed_1", "tcia/seed_2"]
    ran.clear()
    assert pl.main([*base, "--force", "students"]) == 0
    assert [n for n, _ in ran] == ["monuseg_instance/seed_0", "monuseg_instance/seed_1", "monuseg_instance/seed_2"]


def test_each_stage_shares_the_cores_among_the_jobs_it_runs_at_once(tmp_path, monkeypatch):
    """With --parallel 2 on 4 cores: the teacher and make_pseudo run alone with 4 threads, the paired jobs with 2
    each; a stage with one job left takes all 4; an OMP_NUM_THREADS the user set wins."""
    (tmp_path / "monuseg" / "train").mkdir(parents=True)
    monkeypatch.setattr(pl, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = {}
    monkeypatch.setattr(pl.batch, "run_jobs", recorder([], threads=threads))
    base = ["--data-root", str(tmp_path / "monuseg"), "--parallel", "2"]
    assert pl.main(["--root", str(tmp_path / "a"), "--seeds", "0", "1", *base]) == 0
    assert threads == {"teacher monuseg_instance/seed_0": "4", "maps/train": "2", "maps/val": "2", "pseudo": "4",
                       "monuseg_instance/seed_0": "2", "monuseg_instance/seed_1": "2", "tcia/seed_0": "2",
                       "tcia/seed_1": "2"}
    threads.clear()
    assert pl.main(["--root", str(tmp_path / "b"), "--seeds", "0", *base]) == 0  # the students stage: one job
    assert threads["monuseg_instance/seed_0"] == "4" and threads["tcia/seed_0"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    threads.clear()
    assert pl.main(["--root", str(tmp_path / "c"), "--seeds", "0", "1", *base]) == 0
    assert set(threads.values()) == {"3"}


def test_dry_run_prints_what_it_can_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pl.batch, "run_jobs", lambda *a, **k: pytest.fail("nothing may start"))
    assert pl.main(["--root", str(tmp_path), "--seeds", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "python train.py experiment=monuseg_instance seed=0" in out and "make_pseudo.py" in out
    assert "# maps: once the stage before it has run" in out and "# tcia: once the stage before it has run" in out
    assert not (tmp_path / "pipeline.json").exists()
