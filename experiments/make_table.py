#!/usr/bin/env python
"""Regenerate the results tables from ``experiments/*/results.json``.

    python experiments/make_table.py           # rewrite the tables in README.md and experiments/*/README.md
    python experiments/make_table.py --check   # exit 1 if a table is out of date (CI)

Each table lives between ``<!-- results:start -->`` and ``<!-- results:end -->``: the project README gets
one row per experiment and metric, each ``experiments/<name>/README.md`` its own rows plus the per-seed
values. The project README may also hold ``<!-- headline:start -->`` / ``<!-- headline:end -->``: one row per
experiment whose results.json has a ``headline`` (the recipe to use for a data set and the metrics to show first).
Nothing outside the markers is touched. The schema of ``results.json`` is in experiments/README.md;
means and standard deviations are computed here from the per-seed values (sample std, ddof=1), so the
tables never disagree with the measurements.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from histoseg.data.io import atomic_write_text

START, END = "<!-- results:start -->", "<!-- results:end -->"
HEAD_START, HEAD_END = "<!-- headline:start -->", "<!-- headline:end -->"
REQUIRED = ("dataset", "split", "command", "hardware", "budget", "metrics")


class ResultsError(ValueError):
    """A malformed results.json or README (the message names the file)."""


def load_results(path: Path) -> dict:
    """Read and validate one ``results.json``; adds ``name`` (folder name) and computed mean / std / n."""
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(r, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise ResultsError(f"{path}: missing key(s) {missing}; required: {list(REQUIRED)}")
    if not isinstance(r["metrics"], dict) or not r["metrics"]:
        raise ResultsError(f"{path}: 'metrics' must be a non-empty object of metric name -> {{per_seed: [...]}}")
    seeds = r.get("seeds")
    folds = r.get("folds")
    if folds is not None and (not isinstance(folds, list) or not folds):
        raise ResultsError(f"{path}: 'folds' must be a non-empty list (the held-out group of each run)")
    for name, m in r["metrics"].items():
        vals = m.get("per_seed") if isinstance(m, dict) else None
        if not isinstance(vals, list) or not vals or not all(isinstance(v, (int, float)) for v in vals):
            raise ResultsError(f"{path}: metrics.{name}.per_seed must be a non-empty list of numbers")
        if seeds is not None and len(seeds) != len(vals):
            raise ResultsError(f"{path}: metrics.{name} has {len(vals)} values for {len(seeds)} seeds")
        if folds is not None and len(folds) != len(vals):
            raise ResultsError(f"{path}: metrics.{name} has {len(vals)} values for {len(folds)} folds")
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for key, computed in (("mean", mean), ("std", std)):
            if key in m and abs(float(m[key]) - computed) > 5e-4:
                raise ResultsError(
                    f"{path}: metrics.{name}.{key} = {m[key]} but the per-seed values give {computed:.4f}"
                )
        m.update(mean=mean, std=std, n=len(vals))
    source = r.get("source") or {}
    if source and not isinstance(source.get("metrics", {}), dict):
        raise ResultsError(f"{path}: source.metrics must be an object of metric name -> reported value")
    head = r.get("headline")
    if head is not None:
        if (not isinstance(head, dict) or not isinstance(head.get("task"), str) or not isinstance(head.get("rank"), int)
                or isinstance(head.get("rank"), bool)
                or not isinstance(head.get("metrics"), list) or not head["metrics"]):
            raise ResultsError(f"{path}: 'headline' must be {{\"task\": str, \"rank\": int, \"metrics\": [names]}}")
        unknown = [m for m in head["metrics"] if m not in r["metrics"]]
        if unknown:
            raise ResultsError(f"{path}: headline metric(s) {unknown} are not in 'metrics'")
    r["name"] = path.parent.name
    return r


def collect(root: Path) -> list[dict]:
    return [load_results(p) for p in sorted((root / "experiments").glob("*/results.json"))]


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else str(v)


def _ours(m: dict, unit: str = "") -> str:
    """Mean ± sample std and the count; ``unit`` names what the values are when they are not seeds (``folds``)."""
    n = f"n={m['n']}" + (f" {unit}" if unit else "")
    return f"{m['mean']:.3f} ± {m['std']:.3f} ({n})" if m["n"] > 1 else f"{m['mean']:.3f} ({n})"


def _command(r: dict) -> str:
    cmd = r["command"]
    return "; ".join(cmd) if isinstance(cmd, list) else str(cmd)


def _rows(r: dict, link: bool) -> list[str]:
    """One row per metric; the project README (``link``) leaves split, hardware and budget to the experiment's
    own README, so its table stays readable."""
    out = []
    src = r.get("source") or {}
    for metric, m in r["metrics"].items():
        reported = (src.get("metrics") or {}).get(metric)
        target = (r.get("targets") or {}).get(metric)
        name = f"[{r['name']}](experiments/{r['name']}/)" if link else r["name"]
        hit = "" if target is None else (" ✓" if m["mean"] >= target else " ✗")
        cells = [name, r["dataset"]] + ([] if link else [r["split"]]) + [
            metric, _ours(m, "folds" if r.get("folds") else ""), "" if reported is None else _num(reported), "" if target is None else _num(target) + hit]
        if not link:
            cells += [r["hardware"], r["budget"]]
        out.append("| " + " | ".join(cells) + " |")
    return out


HEADER = (
    "| experiment | dataset | split | metric | ours (mean ± std over seeds) | source reported | target | hardware | budget |\n"
    "|---|---|---|---|---|---|---|---|---|"
)
MAIN_HEADER = (
    "| experiment | dataset | metric | ours (mean ± std over seeds) | source reported | target |\n"
    "|---|---|---|---|---|---|"
)


def main_table(results: list[dict]) -> str:
    """The project README's table (one row per experiment and metric; details in each experiment's README)."""
    if not results:
        return "_No results yet: no experiments/*/results.json (see experiments/README.md)._"
    body = [row for r in results for row in _rows(r, link=True)]
    return "\n".join([MAIN_HEADER, *body, "", "The split, hardware, training budget and exact command of every row are in "
                      "the experiment's README (linked). Generated by `python experiments/make_table.py` from "
                      "experiments/*/results.json."])


HEADLINE_HEADER = (
    "| task | recipe (experiment) | ours: mean ± std | runs | target | source reported |\n"
    "|---|---|---|---|---|---|"
)


def headline_table(results: list[dict]) -> str:
    """The recipe to use per data set, its first metrics, targets and the source system's numbers, one row each,
    in ``headline.rank`` order (ties by name)."""
    chosen = sorted((r for r in results if r.get("headline")), key=lambda r: (r["headline"]["rank"], r["name"]))
    if not chosen:
        return "_No headline results yet: no results.json has a 'headline' (see experiments/README.md)._"
    rows = []
    for r in chosen:
        names = r["headline"]["metrics"]
        ms = [r["metrics"][k] for k in names]
        ours = "; ".join(f"{k} {m['mean']:.3f}" + (f" ± {m['std']:.3f}" if m["n"] > 1 else "") for k, m in zip(names, ms))
        ns = {m["n"] for m in ms}
        runs = "/".join(str(n) for n in sorted(ns)) + (" folds" if r.get("folds") else " seed" + ("s" if max(ns) > 1 else ""))
        targets, reported = r.get("targets") or {}, (r.get("source") or {}).get("metrics") or {}
        tgt = "; ".join(f"{k} {_num(targets[k])}" + (" ✓" if m["mean"] >= targets[k] else " ✗")
                        for k, m in zip(names, ms) if k in targets)
        src = "; ".join(f"{k} {_num(reported[k])}" for k in names if k in reported)
        rows.append(f"| {r['headline']['task']} | [{r['name']}](experiments/{r['name']}/) | {ours} | {runs} | {tgt} | {src} |")
    return "\n".join([HEADLINE_HEADER, *rows])


def experiment_table(r: dict) -> str:
    """One experiment's README section: the table, per-seed values, the command and notes."""
    lines = [HEADER, *_rows(r, link=False), ""]
    seeds, folds = r.get("seeds"), r.get("folds")
    if folds:  # cross-validation: one value per held-out group
        lines.append(f"Per fold (held-out {', '.join(map(str, folds))}):")
    else:
        lines.append("Per seed" + (f" (seeds {', '.join(map(str, seeds))})" if seeds else "") + ":")
    lines.append("")
    for metric, m in r["metrics"].items():
        lines.append(f"- {metric}: {', '.join(_num(v) for v in m['per_seed'])}")
    src = r.get("source") or {}
    if src:
        lines += ["", f"Source: {src.get('system', '')}" + (f" ({src['note']})" if src.get("note") else "")]
    lines += ["", f"Command: `{_command(r)}`"]
    if r.get("notes"):
        lines += ["", str(r["notes"])]
    lines += ["", "Generated by `python experiments/make_table.py` from results.json."]
    return "\n".join(lines)


def replace_between_markers(text: str, table: str, path: Path, start: str = START, end: str = END) -> str:
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ResultsError(f"{path}: needs exactly one '{start}' followed by one '{end}' line")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def update(root: Path, check: bool = False) -> list[Path]:
    """Rewrite (or, with ``check``, compare) every table; returns the files that changed / are stale."""
    results = collect(root)
    targets = [(root / "README.md", main_table(results))]
    for r in results:
        readme = root / "experiments" / r["name"] / "README.md"
        if not readme.is_file():
            raise ResultsError(f"{readme}: missing; each experiment folder needs a README.md with the markers")
        targets.append((readme, experiment_table(r)))
    changed = []
    for path, table in targets:
        old = path.read_text(encoding="utf-8")
        new = replace_between_markers(old, table, path)
        if path == root / "README.md" and (HEAD_START in new or HEAD_END in new):
            new = replace_between_markers(new, headline_table(results), path, HEAD_START, HEAD_END)
        if new != old:
            changed.append(path)
            if not check:
                atomic_write_text(path, new)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="project root")
    ap.add_argument("--check", action="store_true", help="exit 1 if a table is out of date; write nothing")
    args = ap.parse_args(argv)
    try:
        changed = update(args.root, check=args.check)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in changed:
        print(("stale: " if args.check else "updated: ") + str(p))
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
