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
on the validation images, the maps cover training and validation images only. ``<root>/pipeline.json`` records each
stage; a rerun skips the stages recorded as done (``--force`` reruns them), and of an unfinished students stage
the students already tested (their ``summary.json`` exists), so a run stopped by ``--deadline-s`` resumes where it
stopped (a student stopped mid-training starts again). ``--set`` overrides go to every training run,
``--eval-set`` to the evaluations (maps and TCIA). Exit status 0 only when every stage and every job finished.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/: the batch runner

import batch  # noqa: E402

from histoseg.data.io import atomic_write_text  # noqa: E402
from histoseg.utils.config import data_root  # noqa: E402
from histoseg.utils.machine import available_cores  # noqa: E402

PRESET = "monuseg_instance"
EVAL = "from histoseg.cli import eval_main; eval_main()"  # histoseg-eval, also where the package is not installed
STAGES = ("teacher", "maps", "pseudo", "students", "tcia")


def selected_checkpoint(run: Path) -> Path:
    """A run's selected checkpoint: its ``epoch_NNN.ckpt`` (the best by validation Dice; the latest if a resumed
    run left several), else ``last.ckpt``."""
    best = sorted((run / "checkpoints").glob("epoch_*.ckpt"))
    if best:
        return best[-1]
    if (run / "checkpoints" / "last.ckpt").is_file():
        return run / "checkpoints" / "last.ckpt"
    raise FileNotFoundError(f"{run / 'checkpoints'}: the run left no checkpoint")


def stage_threads(parallel: int) -> int:
    """Torch threads per job when ``parallel`` jobs share the machine's cores."""
    return max(1, available_cores() // parallel)


def stage_jobs(stage: str, a: argparse.Namespace, root: Path) -> list[batch.Job]:
    """The jobs of one stage (the teacher's checkpoint must exist for the stages after it)."""
    teacher_run = root / "teacher" / PRESET / f"seed_{a.teacher_seed}"
    if stage == "teacher":
        return batch.make_jobs([PRESET], [a.teacher_seed], root / "teacher", [*a.overrides, "test=false"])
    if stage == "maps":
        ckpt = selected_checkpoint(teacher_run)
        jobs = []
        for split in ("train", "val"):
            args = [f"ckpt_path={ckpt}", "dataset=monuseg", f"split={split}", "save_maps=true",
                    f"hydra.run.dir={root / f'teacher_{split}'}", *a.eval_overrides]
            jobs.append(batch.Job(name=f"maps/{split}", log=root / f"teacher_{split}.log", run_dir=root / f"teacher_{split}",
                                  cmd=[sys.executable, "-c", EVAL, *args],
                                  shown=" ".join(["histoseg-eval", *args])))
        return jobs
    if stage == "pseudo":
        args = ["--maps", str(root / "teacher_train"), str(root / "teacher_val"), "--data-root", str(a.data_root),
                "--out", str(root / "instances"), "--report", str(root / "pseudo_quality.json")]
        return [batch.Job(name="pseudo", log=root / "pseudo.log", cmd=[sys.executable, str(HERE / "make_pseudo.py"), *args],
                          shown=" ".join(["python", "experiments/monuseg_instance_pseudo/make_pseudo.py", *args]))]
    if stage == "students":
        jobs = batch.make_jobs([PRESET], a.seeds, root, [f"dataset.reader.instances_dir={root / 'instances'}",
                                                         *a.overrides])
        if a.force is None or (a.force and "students" not in a.force):  # a student that was tested is done
            jobs = [j for j in jobs if not (j.run_dir / "summary.json").is_file()]
        return jobs
    if stage == "tcia":
        jobs = []
        for seed in a.seeds:
            args = [f"ckpt_path={selected_checkpoint(root / PRESET / f'seed_{seed}')}", "dataset=tcia_nuclei",
                    "split=all", f"hydra.run.dir={root / f'tcia_seed_{seed}'}", *a.eval_overrides]
            jobs.append(batch.Job(name=f"tcia/seed_{seed}", log=root / f"tcia_seed_{seed}.log",
                                  run_dir=root / f"tcia_seed_{seed}", cmd=[sys.executable, "-c", EVAL, *args],
                                  shown=" ".join(["histoseg-eval", *args])))
        return jobs
    raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("logs/exp/pseudo"), help="every run and log goes below it")
    ap.add_argument("--teacher-seed", type=int, default=0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the students' seeds")
    ap.add_argument("--parallel", type=int, default=1, help="students (and map evaluations) running at once")
    ap.add_argument("--deadline-s", type=float, default=None, help="stop everything this long after the start")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for the teacher and every student (e.g. trainer=gpu)")
    ap.add_argument("--eval-set", dest="eval_overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for the evaluations (maps, TCIA; e.g. trainer=gpu)")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="the MoNuSeg folder (default: <HISTOSEG_DATA or ../shared/data>/monuseg)")
    ap.add_argument("--force", nargs="*", choices=STAGES, default=None,
                    help="rerun these stages even if pipeline.json records them as done (no names: all)")
    ap.add_argument("--pack", type=Path, default=None, help="write a .tar.gz of --root without checkpoints at the end")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit (the maps and TCIA "
                    "commands need the teacher's / students' checkpoints: a note stands for them until those exist)")
    a = ap.parse_args(argv)
    a.data_root = (a.data_root or Path(data_root()) / "monuseg").resolve()
    return a


def main(argv=None) -> int:
    a = parse(argv)
    root = a.root.resolve()
    state_file = root / "pipeline.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    force = set(STAGES) if a.force == [] else set(a.force or ())
    if a.dry_run:
        for stage in STAGES:
            try:
                jobs = stage_jobs(stage, a, root)
            except FileNotFoundError:
                print(f"# {stage}: once the stage before it has run (it needs that stage's checkpoints)")
                continue
            for job in jobs:
                print(f"# {stage}{' (done: skipped)' if state.get(stage, {}).get('status') == 'ok' else ''}\n{job.shown}")
        return 0
    if not (a.data_root / "train").is_dir():
        raise SystemExit(f"{a.data_root}: no MoNuSeg 'train' folder there; pass --data-root or set HISTOSEG_DATA")
    base_env = {**os.environ, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1")}
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ok = True
    for stage in STAGES:
        if state.get(stage, {}).get("status") == "ok" and stage not in force:
            print(f"[pipeline] {stage}: done in an earlier run, skipped")
            continue
        left = None if a.deadline_s is None else a.deadline_s - (time.monotonic() - t0)
        if left is not None and left <= 0:
            print(f"[pipeline] {stage}: not started (deadline)")
            ok = False
            break
        jobs = stage_jobs(stage, a, root)
        parallel = 1 if stage in ("teacher", "pseudo") else max(1, min(a.parallel, len(jobs)))
        # the cores shared among the jobs running at once (the teacher alone gets them all), unless set by the user
        env = {**base_env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(stage_threads(parallel))}
        batch.run_jobs(jobs, parallel=parallel, deadline_s=left, env=env,
                       echo=lambda m: print(m.replace("[batch]", "[pipeline]")))
        status = "ok" if all(j.status == "ok" for j in jobs) else "failed"
        state[stage] = {"status": status, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "jobs": [j.record(t0) for j in jobs]}
        atomic_write_text(state_file, json.dumps(state, indent=1) + "\n")
        print(f"[pipeline] {stage}: {status}")
        if status != "ok":
            ok = False
            break
    if a.pack:
        batch.pack(root, a.pack.resolve(), 8.0)
        print(f"[pipeline] packed {root} -> {a.pack}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
