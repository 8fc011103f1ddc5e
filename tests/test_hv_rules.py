"""experiments/equal_budget_hv_2cores/rules.py: each hv edge rule's best validation score from tuning tables."""
import json

from tests.helpers_scripts import load_experiment_script

rules = load_experiment_script("equal_budget_hv_2cores/rules")


def tuning(scores: dict[tuple[int, bool, float], float]) -> dict:
    table = [{"hv_ksize": k, "hv_signed": sg, "marker_threshold": t, "aji_pq": v} for (k, sg, t), v in scores.items()]
    best = max(table, key=lambda r: r["aji_pq"])
    return {"objective": "aji_pq", "best": {k: v for k, v in best.items() if k != "aji_pq"}, "val_images": ["a"],
            "table": table}


def test_each_rule_keeps_its_best_setting_and_runs_are_averaged(tmp_path):
    runs = []
    for i, (a, b) in enumerate(((0.50, 0.60), (0.54, 0.70))):
        run = tmp_path / f"seed_{i}"
        run.mkdir()
        # rule (3, False): best over marker thresholds is a; rule (21, True): best is b
        (run / "postprocess_tuning.json").write_text(json.dumps(tuning({
            (3, False, 0.4): a - 0.1, (3, False, 0.5): a, (21, True, 0.4): b, (21, True, 0.5): b - 0.2})))
        runs.append(run)
    out = tmp_path / "val_rules.json"
    rules.main([*map(str, runs), "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["objective"] == "aji_pq"
    assert got["mean_over_runs"] == {"ksize=21,signed=true": 0.65, "ksize=3,signed=false": 0.52}
    assert got["runs"][str(runs[1])]["rules"]["ksize=21,signed=true"] == 0.70
    assert got["runs"][str(runs[0])]["best"]["hv_ksize"] == 21
