"""experiments/monuseg_instance_pseudo/pipeline.py: the two-stage MoNuSeg recipe (teacher -> maps -> pseudo maps ->
students -> TCIA crops) as one resumable command. The stages' own code is tested elsewhere (training, eval save_maps,
make_pseudo); here: which command each stage runs with which overrides, the order, what a rerun keeps, redoes or
refuses, the deadline, the threads and the checkpoint choice, with the runner replaced by a recorder."""
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


def recorder(ran, fail=(), threads=None):
    """A stand-in for batch.run_jobs: records (job, parallel) and each job's torch threads; leaves checkpoints where
    training would and a summary.json where a test or an evaluation would."""
    def run_jobs(jobs, parallel=1, deadline_s=None, env=None, echo=print):
        for j in jobs:
            ran.append((j.name, parallel))
            if threads is not None:
                threads[j.name] = env["OMP_NUM_THREADS"]
            if j.name in fail:
                j.status = "failed"
                continue
            if j.name.startswith(("teacher/", "monuseg_instance/")):
                fake_run(j.run_dir)
            if j.name.startswith(("monuseg_instance/", "tcia/")):
                (j.run_dir / "summary.json").parent.mkdir(parents=True, exist_ok=True)
                (j.run_dir / "summary.json").write_text("{}")
            j.status = "ok"
        return jobs
    return run_jobs


@pytest.fixture
def kit(tmp_path):
    (tmp_path / "kit" / "monuseg" / "train").mkdir(parents=True)
    return tmp_path / "kit"


def test_selected_checkpoint_is_the_chosen_epoch_then_last_then_a_clear_error(tmp_path):
    ck = fake_run(tmp_path, names=("epoch_003.ckpt", "epoch_011.ckpt", "last.ckpt"))
    assert pl.selected_checkpoint(tmp_path) == ck / "epoch_011.ckpt"
    for n in ("epoch_003.ckpt", "epoch_011.ckpt"):
        (ck / n).unlink()
    assert pl.selected_checkpoint(tmp_path) == ck / "last.ckpt"
    (ck / "last.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="the run left no checkpoint"):
        pl.selected_checkpoint(tmp_path)


def test_each_stage_gets_its_own_overrides_and_the_data_dir(tmp_path, kit):
    a = pl.parse(["--root", str(tmp_path), "--teacher-seed", "4", "--seeds", "0", "2",
                  "--set", "trainer=gpu", "dataset.num_workers=4", "--eval-set", "trainer=gpu", "inference.tta=none",
                  "--data-dir", str(kit)])
    ck = fake_run(tmp_path / "teacher" / "monuseg_instance" / "seed_4")
    students = [fake_run(tmp_path / "monuseg_instance" / f"seed_{s}", ("epoch_009.ckpt",)) for s in (0, 2)]
    shown = {s: [j.shown for j in pl.stage_jobs(s, a, tmp_path)] for s in pl.STAGES}
    data = f"paths.data_dir={kit}"
    assert shown["teacher"] == [f"python train.py experiment=monuseg_instance seed=4 hydra.run.dir={tmp_path}/teacher/"
                                f"monuseg_instance/seed_4 {data} trainer=gpu dataset.num_workers=4 test=false"]
    assert [s.split()[3] for s in shown["maps"]] == ["split=train", "split=val"]
    assert all(f"ckpt_path={ck / 'epoch_011.ckpt'}" in s and s.endswith(f"{data} trainer=gpu inference.tta=none")
               and "num_workers" not in s and "save_maps=true" in s for s in shown["maps"])
    assert f"--data-root {kit / 'monuseg'}" in shown["pseudo"][0]
    assert f"--maps {tmp_path}/teacher_train {tmp_path}/teacher_val" in shown["pseudo"][0]
    assert len(shown["students"]) == 2
    for seed, s in zip((0, 2), shown["students"]):
        assert f"seed={seed} " in s and f"dataset.reader.instances_dir={tmp_path}/instances" in s
        assert s.endswith(f"{data} trainer=gpu dataset.num_workers=4") and "test=false" not in s and "tta" not in s
    # each student's own selected checkpoint on every TCIA crop, with the evaluation overrides
    assert shown["tcia"] == [f"histoseg-eval ckpt_path={c / 'epoch_009.ckpt'} dataset=tcia_nuclei split=all "
                             f"hydra.run.dir={tmp_path}/tcia_seed_{seed} {data} trainer=gpu inference.tta=none"
                             for seed, c in zip((0, 2), students)]


def test_stages_run_in_order_resume_after_a_failure_and_force_cascades(tmp_path, kit, monkeypatch):
    root = tmp_path / "r"
    base = ["--root", str(root), "--data-dir", str(kit), "--seeds", "0", "1", "--parallel", "2"]
    ran = []
    monkeypatch.setattr(pl.batch, "run_jobs", recorder(ran, fail={"pseudo"}))
    assert pl.main(base) == 1
    assert ran == [("teacher/seed_0", 1), ("maps/train", 2), ("maps/val", 2), ("pseudo", 1)]
    state = json.loads((root / "pipeline.json").read_text())
    assert [state[s]["status"] for s in ("teacher", "maps", "pseudo")] == ["ok", "ok", "failed"]
    assert "students" not in state
    # the rerun resumes at the failed stage
    ran.clear()
    monkeypatch.setattr(pl.batch, "run_jobs", recorder(ran))
    assert pl.main(base) == 0
    assert ran == [("pseudo", 1), ("monuseg_instance/seed_0", 2), ("monuseg_instance/seed_1", 2),
                   ("tcia/seed_0", 2), ("tcia/seed_1", 2)]
    # all done: nothing runs
    ran.clear()
    assert pl.main(base) == 0 and ran == []
    # --force maps redoes the maps and everything built on them, not the teacher
    assert pl.main([*base, "--force", "maps"]) == 0
    assert [n for n, _ in ran] == ["maps/train", "maps/val", "pseudo", "monuseg_instance/seed_0",
                                   "monuseg_instance/seed_1", "tcia/seed_0", "tcia/seed_1"]


def test_a_rerun_keeps_the_students_already_tested_and_clears_a_stopped_ones_folder(tmp_path, kit, monkeypatch):
    """A deadline that stopped the students stage after seed 1's test: seed 1 is kept; seed 0's folder (a stale
    checkpoint of the stopped run) is cleared before it starts again."""
    root = tmp_path / "r"
    base = ["--root", str(root), "--data-dir", str(kit), "--seeds", "0", "1", "2"]
    ran = []
    monkeypatch.setattr(pl.batch, "run_jobs", recorder(ran, fail={"monuseg_instance/seed_0", "monuseg_instance/seed_2"}))
    assert pl.main(base) == 1
    stale = fake_run(root / "monuseg_instance" / "seed_0", ("epoch_002.ckpt",)) / "epoch_002.ckpt"
    seen_stale = []

    def rerun(jobs, **kw):
        seen_stale.append(stale.exists())
        return recorder(ran)(jobs, **kw)

    ran.clear()
    monkeypatch.setattr(pl.batch, "run_jobs", rerun)
    assert pl.main(base) == 0
    assert [n for n, _ in ran] == ["monuseg_instance/seed_0", "monuseg_instance/seed_2",
                                   "tcia/seed_0", "tcia/seed_1", "tcia/seed_2"]
    assert seen_stale[0] is False  # cleared before the students ran
    # tcia uses each student's fresh checkpoint, not the stale epoch_002
    assert "epoch_011.ckpt" in json.loads((root / "pipeline.json").read_text())["commands"][str(root / "tcia_seed_0")]


def test_a_finished_job_asked_for_with_another_command_is_refused(tmp_path, kit, monkeypatch):
    root = tmp_path / "r"
    base = ["--root", str(root), "--data-dir", str(kit), "--seeds", "0"]
    monkeypatch.setattr(pl.batch, "run_jobs", recorder([]))
    assert pl.main(base) == 0
    with pytest.raises(SystemExit, match=r"teacher/seed_0 was run as(.|\n)*not as(.|\n)*--force teacher"):
        pl.main([*base, "--set", "trainer.max_epochs=32"])
    assert pl.main([*base, "--set", "trainer.max_epochs=32", "--force", "teacher"]) == 0
    # more seeds than before: only the new student and its TCIA score run
    ran = []
    monkeypatch.setattr(pl.batch, "run_jobs", recorder(ran))
    assert pl.main([*base[:-1], "0", "3", "--set", "trainer.max_epochs=32"]) == 0
    assert [n for n, _ in ran] == ["monuseg_instance/seed_3", "tcia/seed_3"]


def test_a_deadline_already_spent_starts_nothing_packs_and_exits_1(tmp_path, kit, monkeypatch, capsys):
    monkeypatch.setattr(pl.batch, "run_jobs", lambda *a, **k: pytest.fail("nothing may start"))
    out = tmp_path / "runs.tar.gz"
    assert pl.main(["--root", str(tmp_path / "r"), "--data-dir", str(kit), "--deadline-s", "0",
                    "--pack", str(out)]) == 1
    assert "teacher: not started (deadline)" in capsys.readouterr().out
    assert out.is_file()


def test_a_missing_data_folder_is_named_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pl.batch, "run_jobs", lambda *a, **k: pytest.fail("nothing may start"))
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nowhere' / 'monuseg'}: no MoNuSeg 'train' folder"):
        pl.main(["--root", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        pl.parse(["--parallel", "0"])


def test_each_stage_shares_the_cores_among_the_jobs_it_runs_at_once(tmp_path, kit, monkeypatch):
    """With --parallel 2 on 4 cores: the teacher and make_pseudo run alone with 4 threads, the paired jobs with 2
    each; a stage with one job takes all 4; an OMP_NUM_THREADS the user set wins."""
    monkeypatch.setattr(pl.batch, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = {}
    monkeypatch.setattr(pl.batch, "run_jobs", recorder([], threads=threads))
    base = ["--data-dir", str(kit), "--parallel", "2"]
    assert pl.main(["--root", str(tmp_path / "a"), "--seeds", "0", "1", *base]) == 0
    assert threads == {"teacher/seed_0": "4", "maps/train": "2", "maps/val": "2", "pseudo": "4",
                       "monuseg_instance/seed_0": "2", "monuseg_instance/seed_1": "2", "tcia/seed_0": "2",
                       "tcia/seed_1": "2"}
    threads.clear()
    assert pl.main(["--root", str(tmp_path / "b"), "--seeds", "0", *base]) == 0  # the students stage: one job
    assert threads["monuseg_instance/seed_0"] == "4" and threads["tcia/seed_0"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    threads.clear()
    assert pl.main(["--root", str(tmp_path / "c"), "--seeds", "0", "1", *base]) == 0
    assert set(threads.values()) == {"3"}


def test_dry_run_prints_what_it_can_and_starts_nothing(tmp_path, kit, monkeypatch, capsys):
    monkeypatch.setattr(pl.batch, "run_jobs", recorder([]))
    assert pl.main(["--root", str(tmp_path / "done"), "--data-dir", str(kit), "--seeds", "0"]) == 0
    monkeypatch.setattr(pl.batch, "run_jobs", lambda *a, **k: pytest.fail("nothing may start"))
    assert pl.main(["--root", str(tmp_path / "new"), "--data-dir", str(kit), "--seeds", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "python train.py experiment=monuseg_instance seed=0" in out and "make_pseudo.py" in out
    assert "# maps: once the stage before it has run" in out and "# tcia: once the stage before it has run" in out
    assert "(done: skipped)" not in out and not (tmp_path / "new" / "pipeline.json").exists()
    assert pl.main(["--root", str(tmp_path / "done"), "--data-dir", str(kit), "--seeds", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("(done: skipped)") == 6  # teacher, 2 maps, pseudo, student, TCIA
    assert pl.main(["--root", str(tmp_path / "done"), "--data-dir", str(kit), "--seeds", "0", "--dry-run",
                    "--force", "students"]) == 0
    assert capsys.readouterr().out.count("(done: skipped)") == 4
