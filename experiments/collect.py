#!/usr/bin/env python
"""Write an experiment's ``results.json`` from the run folders that produced it (no hand-typed numbers).

    python experiments/collect.py monuseg_instance --runs logs/exp/monuseg_instance/seed_* \
        --metrics dice aji pq --hardware "2 CPU cores (x86_64)" --budget "2000 steps x 8 patches"

Each run folder must hold ``summary.json`` (whole-image test metrics, written by the test step or
``histoseg-eval``) and normally ``config.yaml`` (the resolved config: seed and command overrides are read from it and
from ``.hydra/overrides.yaml`` when present; a run of another script may give its ``seed`` in summary.json instead; for a ``histoseg-eval`` run the seed comes from the evaluated
checkpoint's own run folder, ``--seeds`` overriding). Fields already in an existing ``results.json`` that this
script does not measure (``source``, ``targets``, ``notes``, ``split``) are kept.

Each run's ``per_image.csv`` is copied beside it as ``per_image/seed_<s>.csv`` (``fold_<f>.csv`` with ``--folds``;
into ``<out>_per_image/`` with ``--out``), so a later change can be compared image by image
(``experiments/paired.py --base <that csv>``) after the run folders are gone; the copies are replaced together
with results.json.

``--keep-collected`` adds seeds to an experiment whose earlier run folders are gone: the runs already in
results.json (values, run entries, per-image copies) stay unless a run in ``--runs`` has the same seed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml


def run_info(run: Path, metrics: list[str]) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    ov = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(ov.read_text()) if ov.is_file() else None
    missing = [m for m in metrics if m not in summary["mean"]]
    if missing:
        raise SystemExit(f"{run}/summary.json has no {missing}; it has {sorted(summary['mean'])}")
    wall = None
    tim = run / "timing.json"
    if tim.is_file():
        wall = json.loads(tim.read_text())
    ckpt = summary.get("checkpoint")
    own_seed = cfg.get("seed", summary.get("seed"))  # a run without config.yaml (a plain script) may name it there
    return {"seed": training_seed(run, ckpt, own_seed), "metrics": {m: summary["mean"][m] for m in metrics}, "n_images": summary.get("n_images"),
            "overrides": overrides, "timing": wall, "selected": selected_checkpoint(run),
            "members": [repo_relative(c) for c in ckpt] if isinstance(ckpt, list) else None}  # an ensemble's checkpoints


def training_seed(run: Path, ckpt: str | list | None, own_seed):
    """The seed the run's weights were trained with. A training run's own config holds it. A ``histoseg-eval`` run
    (``summary.json`` names its checkpoint, or an ensemble's list) holds the evaluation's seed instead, so the seed
    is read from each checkpoint's run folder (``<run>/checkpoints/<name>.ckpt`` -> ``<run>/config.yaml``), an
    ensemble's members joined as ``0+1+2``; where a folder has no config the evaluation's seed stays, with a
    warning (``--seeds`` sets it)."""
    if ckpt is None:
        return own_seed
    seeds = []
    for c in ckpt if isinstance(ckpt, list) else [ckpt]:
        conf = Path(c).parent.parent / "config.yaml"
        seed = yaml.safe_load(conf.read_text()).get("seed") if conf.is_file() else None
        if seed is None:
            print(f"{run}: no training seed found beside checkpoint {c}; labelled with the evaluation's seed "
                  f"{own_seed} (give --seeds)", file=sys.stderr)
            return own_seed
        seeds.append(seed)
    return seeds[0] if len(seeds) == 1 else "+".join(str(x) for x in seeds)


def repo_relative(path: str) -> str:
    """``path`` relative to the repository when inside it (results.json should not name this machine's folders)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path


def seed_label(v: str) -> int | str:
    """A seed (an int) or a label for several (an ensemble's members, e.g. ``0+1+2``)."""
    return int(v) if v.lstrip("-").isdigit() else v


def in_run_order(labels: list, runs: list[Path], flag: str) -> list:
    """Per-run labels given in the order of ``--runs``, reordered as the runs are processed (sorted by path)."""
    if len(labels) != len(runs):
        raise SystemExit(f"{flag} has {len(labels)} values for {len(runs)} runs")
    return [lab for _, lab in sorted(zip(runs, labels))]


def best_checkpoint(run: Path) -> Path | None:
    """A run's best-by-metric checkpoint ``checkpoints/epoch_NNN.ckpt`` (the latest if a resumed run left
    several), or ``None``."""
    found = sorted((run / "checkpoints").glob("epoch_*.ckpt")) if (run / "checkpoints").is_dir() else []
    return found[-1] if found else None


def selected_checkpoint(run: Path) -> dict | None:
    """The best checkpoint's epoch (``checkpoints/epoch_NNN.ckpt``) and, where the run logged ``time/fit_min``
    (histoseg's WallClock callback), the wall-clock minutes of fitting after which it existed."""
    import csv
    import re

    best = best_checkpoint(run)
    m = re.fullmatch(r"epoch_(\d+)\.ckpt", best.name) if best is not None else None
    if m is None:
        return None
    epoch, minutes = int(m.group(1)), None
    log = run / "csv" / "metrics.csv"
    if log.is_file():
        with log.open() as f:
            for r in csv.DictReader(f):
                if r.get("time/fit_min") and r.get("epoch") not in (None, "") and int(float(r["epoch"])) == epoch:
                    minutes = round(float(r["time/fit_min"]), 1)
    return {"epoch": epoch, "fit_min": minutes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="experiment folder under experiments/")
    ap.add_argument("--runs", nargs="+", required=True, type=Path)
    ap.add_argument("--metrics", nargs="+", default=["dice", "aji", "pq"])
    ap.add_argument("--dataset", required=False)
    ap.add_argument("--split", required=False)
    ap.add_argument("--hardware", required=True)
    ap.add_argument("--budget", required=True)
    ap.add_argument("--command", nargs="+", required=True, help="the command(s) that made the runs")
    ap.add_argument("--out", default=None, help="results file name (default results.json)")
    ap.add_argument("--seeds", nargs="+", type=seed_label, default=None,
                    help="the training seeds of the runs, in --runs order (default: each run's config; for a "
                         "histoseg-eval run the evaluated checkpoint's run folder's); an ensemble's as one label, "
                         "e.g. 0+1+2")
    ap.add_argument("--folds", nargs="+", default=None,
                    help="cross-validation: the held-out group of each run, in --runs order (e.g. Case_10 Case_11); "
                         "the tables then give the mean ± std over folds")
    ap.add_argument("--keep-collected", action="store_true",
                    help="keep the runs already in results.json whose seed no run in --runs has (their values, "
                         "run entries and per-image copies), to add seeds after the earlier run folders are gone")
    a = ap.parse_args(argv)
    folder = Path(__file__).resolve().parent / a.name
    out = folder / (a.out or "results.json")
    old = json.loads(out.read_text()) if out.is_file() else {}
    runs = [run_info(r, a.metrics) for r in sorted(a.runs)]
    if a.seeds is not None:
        for r, s in zip(runs, in_run_order(a.seeds, a.runs, "--seeds")):
            r["seed"] = s
    folds = in_run_order(a.folds, a.runs, "--folds") if a.folds is not None else None
    entries = [{"dir": str(p), "seed": r["seed"], **({"fold": f} if folds else {}), "n_images": r["n_images"],
                "timing": r["timing"], "selected_checkpoint": r["selected"],
                **({"members": r["members"]} if r["members"] else {})}
               for p, r, f in zip(sorted(a.runs), runs, folds or [None] * len(runs))]
    values = [{m: round(float(r["metrics"][m]), 6) for m in a.metrics} for r in runs]
    labels = [f"fold_{f}" for f in folds] if folds else [f"seed_{r['seed']}" for r in runs]
    copies = per_image_copies(sorted(a.runs), labels)  # label -> csv path
    if a.keep_collected:
        if folds or old.get("folds"):
            raise SystemExit("--keep-collected adds seeds; it does not combine with --folds")
        kept = kept_runs(old, out, a.metrics, {r["seed"] for r in runs})
        for k in kept:
            entries.append(k["entry"])
            values.append(k["values"])
            if k["per_image"] is not None:
                copies[f"seed_{k['entry']['seed']}"] = k["per_image"]
        order = sorted(range(len(entries)), key=lambda i: seed_order(entries[i]["seed"]))
        entries, values = [entries[i] for i in order], [values[i] for i in order]
    res = dict(old)
    res.pop("folds", None)
    res.update(
        dataset=a.dataset or old.get("dataset") or a.name,
        split=a.split or old.get("split", "test"),
        command=a.command,
        hardware=a.hardware,
        budget=a.budget,
        seeds=[e["seed"] for e in entries],
        metrics={m: {"per_seed": [v[m] for v in values]} for m in a.metrics},
        runs=entries,
        **({"folds": folds} if folds else {}),
    )
    folder.mkdir(parents=True, exist_ok=True)
    # per-image copies: replaced together with results.json (stale ones from an earlier collect are removed)
    sub = f"{out.stem}_per_image" if a.out else "per_image"
    texts = {label: Path(src).read_text() for label, src in sorted(copies.items())}  # read before the old copies go
    shutil.rmtree(folder / sub, ignore_errors=True)
    res.pop("per_image", None)
    if texts:
        (folder / sub).mkdir()
        for label, text in texts.items():
            (folder / sub / f"{label}.csv").write_text(text)
        res["per_image"] = {label: f"{sub}/{label}.csv" for label in copies}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def seed_order(seed) -> tuple:
    """Integer seeds first, in order, then labels such as an ensemble's ``0+1+2``."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def kept_runs(old: dict, out: Path, metrics: list[str], new_seeds: set) -> list[dict]:
    """The runs of an earlier ``results.json`` (``old``, read from ``out``) whose seed is not in ``new_seeds``:
    each one's run entry, its value of every metric in ``metrics`` and its per-image copy (a path, or None)."""
    seeds, entries = old.get("seeds", []), old.get("runs", [])
    if len(entries) != len(seeds):
        raise SystemExit(f"{out}: --keep-collected needs one run entry per seed; it has {len(entries)} for {len(seeds)}")
    kept = []
    for i, seed in enumerate(seeds):
        if seed in new_seeds:
            continue
        vals = {}
        for m in metrics:
            per = old.get("metrics", {}).get(m, {}).get("per_seed")
            if per is None or len(per) != len(seeds):
                raise SystemExit(f"{out}: seed {seed} has no kept value of {m}; collect its run again or leave {m} out")
            vals[m] = per[i]
        rel = old.get("per_image", {}).get(f"seed_{seed}")
        if rel and not (out.parent / rel).is_file():
            raise SystemExit(f"{out}: seed {seed}'s per-image copy {out.parent / rel} is missing")
        kept.append({"entry": entries[i], "values": vals, "per_image": out.parent / rel if rel else None})
    return kept


def per_image_copies(runs: list[Path], labels: list[str]) -> dict[str, Path]:
    """``label -> run/per_image.csv`` for the runs that have one; labels must be unique among them."""
    found = {}
    for run, label in zip(runs, labels):
        src = run / "per_image.csv"
        if not src.is_file():
            continue
        if label in found:
            raise SystemExit(f"two runs would both copy per_image.csv as {label}.csv: {found[label].parent} and {run}")
        found[label] = src
    return found


if __name__ == "__main__":
    main()
