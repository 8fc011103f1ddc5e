#!/usr/bin/env python
"""The recommended MoNuSeg recipe in one command: teacher -> its maps -> pseudo instance maps -> students -> TCIA.

    python experiments/monuseg_instance_pseudo/pipeline.py --root logs/exp/pseudo --seeds 0 1 2
    python experiments/monuseg_instance_pseudo/pipeline.py ... --parallel 3 --deadline-s 540 \\
        --set trainer=gpu dataset.num_workers=4 --eval-set trainer=gpu --pack $OUT/runs.tar.gz   # a lent GPU
    python experiments/collect.py monuseg_instance_pseudo --runs logs/exp/pseudo/monuseg_instance/seed_* ...

Stages (the commands of ``README.md`` beside this file, run in order; each is a job of ``experiments/batch.py``'s
runner, with one log per job under ``--root``):

1. ``teacher``: ``train.py experiment=monuseg_instance seed=<teacher seed>`` without the test (its checkpoint is
   chosen on validation Dice and carries its watershed thresholds tuned on the validation images);
2. ``maps``: ``histoseg-eval ... save_maps=true`` of that checkpoint on the training and the validation images;
3. ``pseudo``: ``make_pseudo.py`` splits the 17 mask-only training masks with the teacher's maps;
4. ``students``: ``train.py experiment=monuseg_instance dataset.reader.instances_dir=<pseudo maps>`` per seed,
   ``--parallel`` at a time, each tested on the official test images as usual;
5. ``tcia``: ``histoseg-eval`` of each student's selected checkpoint on all 10 TCIA nuclei crops (an unseen source,
   no retraining), into ``<root>/tcia_seed_<s>``.

No test image is touched before stage 4's test: the teacher trains on the training split and is selected and tuned
on the validation images, the maps cover training and validation images only.

``<root>/pipeline.json`` records each stage and the command of each finished job. A rerun skips what is done: the
stages recorded as finished, and each student or TCIA score whose ``summary.json`` exists, so a run stopped by
``--deadline-s`` resumes where it stopped (a job that was stopped starts again from scratch, its folder cleared
first). A finished job asked for with another command (other seeds' overrides, data, teacher) is refused, naming
both commands; ``--force <stage>`` redoes a stage and every stage after it. ``--set`` overrides go to every training
run, ``--eval-set`` to the evaluations (maps and TCIA), ``--data-dir`` to all of them. Exit status 0 only when
every stage and every job finished.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/: the batch runner, collect's checkpoint choice

import batch  # noqa: E402
import collect  # noqa: E402

from histoseg.data.io import atomic_write_text  # noqa: E402
from histoseg.utils.config import data_root  # noqa: E402

PRESET = "monuseg_instance"
EVAL = "from histoseg.cli import eval_main; eval_main()"  # histoseg-eval, also where the package is not installed
STAGES = ("teacher", "maps", "pseudo", "students", "tcia")


def selected_checkpoint(run: Path) -> Path:
    """A run's selected checkpoint: its ``epoch_NNN.ckpt`` (the best by validation Dice; the latest if a resumed
    run left several), else ``last.ckpt``."""
    best = collect.best_checkpoint(run)
    if best is not None:
        return best
    if (run / "checkpoints" / "last.ckpt").is_file():
        return run / "checkpoints" / "last.ckpt"
    raise FileNotFoundError(f"{run / 'checkpoints'}: the run left no checkpoint")


def _eval_job(name: str, run_dir: Path, args: list[str]) -> batch.Job:
    return batch.Job(name=name, log=run_dir.with_suffix(".log"), run_dir=run_dir, cmd=[sys.executable, "-c", EVAL, *args],
                     shown=" ".join(["histoseg-eval", *args]))


def stage_jobs(stage: str, a: argparse.Namespace, root: Path) -> list[batch.Job]:
    """Every job of one stage (the maps need the teacher's checkpoint, TCIA the students')."""
    data = [f"paths.data_dir={a.data_dir}"]
    if stage == "teacher":
        jobs = batch.make_jobs([PRESET], [a.teacher_seed], root / "teacher", [*data, *a.overrides, "test=false"])
        for j in jobs:
            j.name = f"teacher/seed_{a.teacher_seed}"
        return jobs
    if stage == "maps":
        ckpt = selected_checkpoint(root / "teacher" / PRESET / f"seed_{a.teacher_seed}")
        return [_eval_job(f"maps/{split}", root / f"teacher_{split}",
                          [f"ckpt_path={ckpt}", "dataset=monuseg", f"split={split}", "save_maps=true",
                           f"hydra.run.dir={root / f'teacher_{split}'}", *data, *a.eval_overrides])
                for split in ("train", "val")]
    if stage == "pseudo":
        args = ["--maps", str(root / "teacher_train"), str(root / "teacher_val"), "--data-root",
                str(a.data_dir / "monuseg"), "--out", str(root / "instances"), "--report", str(root / "pseudo_quality.json")]
        return [batch.Job(name="pseudo", log=root / "pseudo.log", run_dir=root / "instances",
                          cmd=[sys.executable, str(HERE / "make_pseudo.py"), *args],
                          shown=" ".join(["python", "experiments/monuseg_instance_pseudo/make_pseudo.py", *args]))]
    if stage == "students":
        return batch.make_jobs([PRESET], a.seeds, root, [f"dataset.reader.instances_dir={root / 'instances'}", *data,
                                                         *a.overrides])
    if stage == "tcia":
        return [_eval_job(f"tcia/seed_{seed}", root / f"tcia_seed_{seed}",
                          [f"ckpt_path={selected_checkpoint(root / PRESET / f'seed_{seed}')}", "dataset=tcia_nuclei",
                           "split=all", f"hydra.run.dir={root / f'tcia_seed_{seed}'}", *data, *a.eval_overrides])
                for seed in a.seeds]
    raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")


def forced_stages(force: list[str] | None) -> set[str]:
    """``--force`` (no names: every stage) and every stage after the first one named: they are built on it."""
    if force is None:
        return set()
    first = min((STAGES.index(s) for s in force), default=0)
    return set(STAGES[first:])


def is_done(job: batch.Job, stage: str, state: dict, root: Path) -> bool:
    """A job finished in an earlier run with the same command. Students and TCIA scores count as done once their
    ``summary.json`` exists (a deadline may stop a stage between its jobs); the other stages when ``pipeline.json``
    records the stage as finished. The same job with another command (other seeds, overrides or data) is refused
    rather than silently kept or redone."""
    recorded = state.get("commands", {}).get(str(job.run_dir))
    if stage in ("students", "tcia"):
        done = (job.run_dir / "summary.json").is_file()
    else:
        done = state.get(stage, {}).get("status") == "ok"
    if done and recorded is not None and recorded != job.shown:
        raise SystemExit(f"{root / 'pipeline.json'}: {job.name} was run as\n  {recorded}\nnot as\n  {job.shown}\n"
                         f"use another --root, or --force {stage} to redo it (and the stages after it)")
    return done and recorded is not None


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("logs/exp/pseudo"), help="every run and log goes below it")
    ap.add_argument("--teacher-seed", type=int, default=0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the students' seeds")
    ap.add_argument("--parallel", type=int, default=1, help="students (and evaluations) running at once")
    ap.add_argument("--deadline-s", type=float, default=None, help="stop everything this long after the start")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for the teacher and every student (e.g. trainer=gpu)")
    ap.add_argument("--eval-set", dest="eval_overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for the evaluations (maps, TCIA; e.g. trainer=gpu)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="the data kit's root, holding monuseg/ and tcia_nuclei/ (default: HISTOSEG_DATA, else "
                         "../shared/data); every stage reads it (paths.data_dir)")
    ap.add_argument("--force", nargs="*", choices=STAGES, default=None,
                    help="redo these stages and every stage after them (no names: all)")
    ap.add_argument("--pack", type=Path, default=None, help="write a .tar.gz of --root without checkpoints at the end")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit (the maps and TCIA "
                    "commands need the teacher's / students' checkpoints: a note stands for them until those exist)")
    a = ap.parse_args(argv)
    if a.parallel < 1:
        ap.error(f"--parallel must be >= 1, got {a.parallel}")
    a.data_dir = (a.data_dir or Path(data_root())).resolve()
    return a


def run_stages(a: argparse.Namespace, root: Path, state: dict, state_file: Path) -> bool:
    forced = forced_stages(a.force)
    t0 = time.monotonic()
    for stage in STAGES:
        jobs = stage_jobs(stage, a, root)
        todo = jobs if stage in forced else [j for j in jobs if not is_done(j, stage, state, root)]
        if not todo:
            print(f"[pipeline] {stage}: done in an earlier run, skipped")
            continue
        left = None if a.deadline_s is None else a.deadline_s - (time.monotonic() - t0)
        if left is not None and left <= 0:
            print(f"[pipeline] {stage}: not started (deadline)")
            return False
        for j in todo:  # a job starts from scratch: nothing stale (an older checkpoint, maps, a summary) may stay
            if j.run_dir.exists():
                shutil.rmtree(j.run_dir)
            state.setdefault("commands", {}).pop(str(j.run_dir), None)
        parallel = 1 if stage in ("teacher", "pseudo") else a.parallel
        # the cores shared among the jobs running at once (the teacher alone gets them all), unless set by the user
        batch.run_jobs(todo, parallel=parallel, deadline_s=left, env=batch.job_env(parallel, len(todo)),
                       echo=lambda m: print(m.replace("[batch]", "[pipeline]")))
        for j in todo:
            if j.status == "ok":
                state["commands"][str(j.run_dir)] = j.shown
        status = "ok" if all(j.status == "ok" for j in todo) else "failed"
        state[stage] = {"status": status, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "jobs": {**state.get(stage, {}).get("jobs", {}), **{j.name: j.record(t0) for j in todo}}}
        atomic_write_text(state_file, json.dumps(state, indent=1) + "\n")
        print(f"[pipeline] {stage}: {status}")
        if status != "ok":
            return False
    return True


def main(argv=None) -> int:
    a = parse(argv)
    root = a.root.resolve()
    state_file = root / "pipeline.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if a.dry_run:
        forced = forced_stages(a.force)
        for stage in STAGES:
            try:
                jobs = stage_jobs(stage, a, root)
            except FileNotFoundError:
                print(f"# {stage}: once the stage before it has run (it needs that stage's checkpoints)")
                continue
            for job in jobs:
                done = stage not in forced and is_done(job, stage, state, root)
                print(f"# {job.name}{' (done: skipped)' if done else ''}\n{job.shown}")
        return 0
    if not (a.data_dir / "monuseg" / "train").is_dir():
        raise SystemExit(f"{a.data_dir / 'monuseg'}: no MoNuSeg 'train' folder there; pass --data-dir or set HISTOSEG_DATA")
    root.mkdir(parents=True, exist_ok=True)
    try:
        ok = run_stages(a, root, state, state_file)
    finally:  # a lent machine returns what finished, whatever stopped the run
        if a.pack:
            batch.pack(root, a.pack.resolve(), 8.0)
            print(f"[pipeline] packed {root} -> {a.pack}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
