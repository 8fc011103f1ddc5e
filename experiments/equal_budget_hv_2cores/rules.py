"""The validation score of each hv edge rule: for every (hv_ksize, hv_signed) in a tuning grid, the best aji_pq
over the rest of the grid, per run, from the runs' ``postprocess_tuning.json`` (what histoseg-eval's tuning wrote).

    python experiments/equal_budget_hv_2cores/rules.py logs/exp/hv25/hvgrid/seed_{0,1,2} \
        --out experiments/equal_budget_hv_2cores/val_rules.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def rule_scores(tuning: dict) -> dict[str, float]:
    objective = tuning["objective"]
    best: dict[str, float] = {}
    for row in tuning["table"]:
        key = f"ksize={row['hv_ksize']},signed={str(row['hv_signed']).lower()}"
        best[key] = max(best.get(key, float("-inf")), float(row[objective]))
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    per_run, objective = {}, None
    for run in args.runs:
        tuning = json.loads((run / "postprocess_tuning.json").read_text())
        objective = tuning["objective"]
        per_run[str(run)] = {"best": tuning["best"], "val_images": tuning["val_images"], "rules": rule_scores(tuning)}
    rules = sorted({k for r in per_run.values() for k in r["rules"]})
    mean = {k: round(sum(r["rules"][k] for r in per_run.values()) / len(per_run), 4) for k in rules}
    out = {"objective": objective, "mean_over_runs": mean, "runs": per_run,
           "command": "python experiments/equal_budget_hv_2cores/rules.py " + " ".join(map(str, args.runs))
                      + f" --out {args.out}"}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for k in rules:
        print(f"{k:24s} {objective} {mean[k]:.4f}  per run " + " ".join(f"{r['rules'][k]:.4f}" for r in per_run.values()))


if __name__ == "__main__":
    main()
