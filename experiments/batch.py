#!/usr/bin/env python
"""Run several experiment presets x seeds as one batch: N jobs at a time, a wall-clock deadline for the whole
batch, one log per job, a ``batch.json`` summary, and optionally a tarball of the run folders without checkpoints.

    python experiments/batch.py nuclei_instance brecahad_strong --seeds 0 1 2 --parallel 3 \\
        --root logs/exp/batch --deadline-s 540 --pack runs.tar.gz --set trainer=gpu dataset.num_workers=4 \\
        ++dataset.split.seed=0    # one split for every seed (random splits are otherwise drawn from the seed)

Each job is ``python train.py experiment=<name> seed=<s> hydra.run.dir=<root>/<name>/seed_<s> <--set ...>``,
so ``experiments/collect.py <folder> --runs <root>/<name>/seed_*`` turns the finished runs into a results.json.
Jobs share the machine: on a GPU they share the device, on a CPU each gets cores / min(parallel, jobs) torch
threads (``OMP_NUM_THREADS``, unless already set). When the deadline passes, running jobs are stopped (their whole
process group, data-loader workers included), jobs not yet started are reported as such, and the summary and
tarball are still written, so a time-limited machine (a lent GPU) always returns what finished.
Exit status: 0 when every job finished with status 0, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from histoseg.data.io import atomic_write_text
from histoseg.utils.machine import available_cores

ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 15


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    run_dir: Path | None = None
    shown: str | None = None  # the command as a reader would type it (default: cmd)
    status: str = "pending"  # pending | running | ok | failed | timeout | not_started
    returncode: int | None = None
    started: float | None = None
    wall_s: float | None = None
    metrics: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def record(self, t0: float) -> dict:
        return {"name": self.name, "cmd": self.shown or " ".join(self.cmd), "log": str(self.log),
                "run_dir": str(self.run_dir) if self.run_dir else None, "status": self.status,
                "returncode": self.returncode, "wall_s": self.wall_s, "metrics": self.metrics,
                "started_s": None if self.started is None else round(self.started - t0, 1)}


def log_tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _signal(job: Job, sig: int) -> None:
    try:
        os.killpg(job.proc.pid, sig)  # the whole group: the trainer and its data-loader workers
    except ProcessLookupError:
        pass


def _stop_all(jobs: list[Job], grace_s: float) -> None:
    """SIGTERM every job's process group at once, then SIGKILL what outlives one shared grace period."""
    for job in jobs:
        _signal(job, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for job in jobs:
        try:
            job.proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for job in jobs:
        _signal(job, signal.SIGKILL)
        job.proc.wait()


def run_jobs(jobs: list[Job], parallel: int = 1, deadline_s: float | None = None, env: dict | None = None,
             poll_s: float = 0.5, grace_s: float = 20.0, echo=print) -> list[Job]:
    """Run ``jobs`` at most ``parallel`` at a time; stop everything still running ``deadline_s`` after the start."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    t0 = time.monotonic()
    pending, running = list(jobs), []
    while pending or running:
        now = time.monotonic()
        if deadline_s is not None and now - t0 >= deadline_s:
            _stop_all(running, grace_s)
            for job in running:
                job.status, job.returncode = "timeout", job.proc.returncode
                job.wall_s = round(time.monotonic() - job.started, 1)
                echo(f"[batch] {job.name}: stopped at the {deadline_s:.0f} s deadline after {job.wall_s:.0f} s")
            for job in pending:
                job.status = "not_started"
                echo(f"[batch] {job.name}: not started (deadline)")
            break
        for job in list(running):
            rc = job.proc.poll()
            if rc is None:
                continue
            running.remove(job)
            job.returncode, job.wall_s = rc, round(time.monotonic() - job.started, 1)
            job.status = "ok" if rc == 0 else "failed"
            echo(f"[batch] {job.name}: {job.status} (exit {rc}) after {job.wall_s:.0f} s; log {job.log}")
            if rc != 0:
                echo(log_tail(job.log))
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with job.log.open("wb") as fh:  # the child keeps its own descriptor
                job.proc = subprocess.Popen(job.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
            job.started, job.status = time.monotonic(), "running"
            running.append(job)
            echo(f"[batch] {job.name}: started ({len(running)} running, {len(pending)} waiting)")
        time.sleep(poll_s)
    return jobs


def read_metrics(run_dir: Path | None) -> dict:
    """The whole-image test means a finished run wrote (``summary.json``), else {}."""
    f = run_dir / "summary.json" if run_dir else None
    if f is None or not f.is_file():
        return {}
    try:
        return {k: round(float(v), 4) for k, v in json.loads(f.read_text()).get("mean", {}).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def pack(root: Path, out: Path, max_mb: float) -> list[str]:
    """tar.gz of ``root`` without checkpoints or files over ``max_mb``; written to a temporary name first, so
    ``out`` is either complete or absent. Returns the paths left out."""
    left_out = []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.resolve() == tmp.resolve():
                continue
            if p.suffix == ".ckpt" or p.stat().st_size > max_mb * 2**20:
                left_out.append(str(p.relative_to(root)))
                continue
            tar.add(p, arcname=str(Path(root.name) / p.relative_to(root)))
    tmp.replace(out)
    return left_out


def job_env(parallel: int, n_jobs: int) -> dict:
    """The jobs' environment: the cores shared among the jobs running at once (``min(parallel, n_jobs)``) as torch
    threads (``OMP_NUM_THREADS``, unless already set) and unbuffered output for the logs."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // min(parallel, n_jobs)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def make_jobs(experiments: list[str], seeds: list[int], root: Path, overrides: list[str]) -> list[Job]:
    jobs = []
    for name in experiments:
        for seed in seeds:
            run_dir = root / name / f"seed_{seed}"
            args = [f"experiment={name}", f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides]
            jobs.append(Job(name=f"{name}/seed_{seed}", cmd=[sys.executable, str(ROOT / "train.py"), *args],
                            log=root / name / f"seed_{seed}.log", run_dir=run_dir,
                            shown=" ".join(["python", "train.py", *args])))
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+", help="preset names under conf/experiment/")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--parallel", type=int, default=1, help="jobs running at once (default 1)")
    ap.add_argument("--root", type=Path, default=Path("logs/exp/batch"), help="run folders: <root>/<name>/seed_<s>")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides given to every job, e.g. trainer=gpu dataset.num_workers=4")
    ap.add_argument("--deadline-s", type=float, default=None, help="stop the batch this many seconds after its start")
    ap.add_argument("--pack", type=Path, default=None, help="write a .tar.gz of <root> without checkpoints")
    ap.add_argument("--pack-max-mb", type=float, default=8.0, help="leave files larger than this out of --pack")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    a = ap.parse_args(argv)
    if a.parallel < 1:
        ap.error(f"--parallel must be >= 1, got {a.parallel}")
    known = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    unknown = [e for e in a.experiments if e not in known]
    if unknown:
        ap.error(f"no preset {unknown} under {ROOT / 'conf' / 'experiment'}; known: {sorted(known)}")
    root = a.root.resolve()
    jobs = make_jobs(a.experiments, a.seeds, root, a.overrides)
    if a.dry_run:
        for job in jobs:
            print(job.shown)
        return 0
    env = job_env(a.parallel, len(jobs))
    t0, started_at = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    root.mkdir(parents=True, exist_ok=True)
    run_jobs(jobs, parallel=a.parallel, deadline_s=a.deadline_s, env=env)
    for job in jobs:
        job.metrics = read_metrics(job.run_dir)
    summary = {"started": started_at, "wall_s": round(time.monotonic() - t0, 1), "parallel": a.parallel,
               "deadline_s": a.deadline_s, "overrides": a.overrides, "omp_num_threads": env["OMP_NUM_THREADS"],
               "jobs": [j.record(t0) for j in jobs]}
    atomic_write_text(root / "batch.json", json.dumps(summary, indent=1) + "\n")
    print(f"\n{'job':40s} {'status':12s} {'wall_s':>8s}  test metrics")
    for j in jobs:
        shown = ", ".join(f"{k}={j.metrics[k]:.3f}" for k in ("dice", "aji", "pq", "psnr") if k in j.metrics)
        print(f"{j.name:40s} {j.status:12s} {j.wall_s if j.wall_s is not None else '-':>8}  {shown}")
    if a.pack:
        left = pack(root, a.pack.resolve(), a.pack_max_mb)
        print(f"packed {root} -> {a.pack} ({len(left)} checkpoint / large files left out)")
    return 0 if all(j.status == "ok" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
