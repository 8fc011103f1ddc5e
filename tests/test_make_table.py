"""experiments/make_table.py regenerates the results tables from results.json files (fixture numbers)."""
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers_scripts import load_experiment_script

ROOT = Path(__file__).resolve().parents[1]


mt = load_experiment_script("make_table")
MARKED = "# {title}\n\nintro stays\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\nfooter stays\n"


def project(tmp_path, results: dict[str, dict]) -> Path:
    (tmp_path / "README.md").write_text(MARKED.format(title="project"))
    for name, res in results.items():
        d = tmp_path / "experiments" / name
        d.mkdir(parents=True)
        (d / "README.md").write_text(MARKED.format(title=name))
        (d / "results.json").write_text(json.dumps(res))
    return tmp_path


FIXTURE = {
    "dataset": "fixture_set",
    "split": "fixture test split",
    "command": ["python train.py experiment=fixture seed=0", "python train.py experiment=fixture seed=1"],
    "hardware": "fixture hardware",
    "budget": "fixture budget",
    "seeds": [0, 1, 2],
    "metrics": {"dice": {"per_seed": [0.5, 0.6, 0.7]}, "aji": {"per_seed": [0.2, 0.2, 0.2], "mean": 0.2}},
    "source": {"system": "fixture seed", "metrics": {"dice": 0.55}},
    "targets": {"dice": 0.55, "aji": 0.3},
}


def test_tables_are_regenerated_between_markers_only(tmp_path):
    root = project(tmp_path, {"alpha": FIXTURE})
    assert mt.main(["--root", str(root)]) == 0
    readme = (root / "README.md").read_text()
    assert readme.startswith("# project\n\nintro stays\n") and readme.endswith("footer stays\n")
    assert "old table" not in readme
    # mean and sample std computed from the per-seed values: 0.6 +- 0.1; Dice target hit, AJI missed
    assert "| [alpha](experiments/alpha/) | fixture_set | dice | 0.600 ± 0.100 (n=3) | 0.550 | 0.550 ✓ |" in readme
    assert "| aji | 0.200 ± 0.000 (n=3) |  | 0.300 ✗ |" in readme
    exp = (root / "experiments" / "alpha" / "README.md").read_text()
    # the experiment's own table keeps split, hardware and budget beside each number
    assert "| alpha | fixture_set | fixture test split | dice | 0.600 ± 0.100 (n=3) | 0.550 | 0.550 ✓ | fixture hardware | fixture budget |" in exp
    assert "- dice: 0.500, 0.600, 0.700" in exp and "seeds 0, 1, 2" in exp
    assert "Command: `python train.py experiment=fixture seed=0; python train.py experiment=fixture seed=1`" in exp
    # idempotent, and --check agrees
    assert mt.main(["--root", str(root), "--check"]) == 0
    assert mt.update(root) == []


def test_check_reports_stale_tables_without_writing(tmp_path):
    root = project(tmp_path, {"alpha": FIXTURE})
    before = (root / "README.md").read_text()
    assert mt.main(["--root", str(root), "--check"]) == 1
    assert (root / "README.md").read_text() == before


def test_no_results_gives_a_placeholder(tmp_path):
    (tmp_path / "README.md").write_text(MARKED.format(title="p"))
    (tmp_path / "experiments").mkdir()
    mt.update(tmp_path)
    assert "No results yet" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("broken,message", [
    ({"metrics": {}}, "metrics' must be a non-empty object"),
    ({"metrics": {"dice": {"per_seed": [0.5, 0.6]}}}, "has 2 values for 3 seeds"),
    ({"metrics": {"dice": {"per_seed": [0.5, 0.6, 0.7], "mean": 0.9}}}, r"mean = 0.9 but the per-seed values give 0.6000"),
    ({"hardware": None}, None),
])
def test_malformed_results_name_the_file(tmp_path, broken, message):
    res = {**FIXTURE, **broken}
    if broken.get("hardware", 1) is None:
        del res["hardware"]
        message = r"missing key\(s\) \['hardware'\]"
    root = project(tmp_path, {"beta": res})
    with pytest.raises(mt.ResultsError, match=message) as e:
        mt.update(root)
    assert "beta/results.json" in str(e.value)
    assert mt.main(["--root", str(root)]) == 2


def test_missing_markers_is_an_error(tmp_path):
    root = project(tmp_path, {"alpha": FIXTURE})
    (root / "experiments" / "alpha" / "README.md").write_text("# no markers\n")
    with pytest.raises(mt.ResultsError, match=r"alpha/README.md: needs exactly one"):
        mt.update(root)


def test_the_repository_tables_are_up_to_date():
    assert mt.update(ROOT, check=True) == [], "run: python experiments/make_table.py"


def test_collect_reads_the_selected_checkpoint_and_its_wall_time(tmp_path):
    """experiments/collect.py: per run, the seed, the test metrics and the best checkpoint's epoch together with
    the WallClock minutes logged for that epoch (so "reached within N min" is measured, not estimated)."""
    collect = load_experiment_script("collect")
    run = tmp_path / "seed_1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "csv").mkdir()
    (run / "summary.json").write_text(json.dumps({"n_images": 14, "mean": {"dice": 0.8, "aji": 0.6}}))
    (run / "config.yaml").write_text("seed: 1\n")
    for name in ("epoch_002.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    (run / "csv" / "metrics.csv").write_text(
        "epoch,step,time/fit_min,val/dice\n0,3,,0.5\n0,3,1.25,\n1,7,2.5,\n2,11,3.75,\n2,11,,0.7\n3,15,5.0,\n")
    info = collect.run_info(run, ["dice"])
    assert info["seed"] == 1 and info["metrics"] == {"dice": 0.8} and info["n_images"] == 14
    assert info["selected"] == {"epoch": 2, "fit_min": 3.8}  # 3.75 rounded to 0.1 min
    with pytest.raises(SystemExit, match="has no \\['pq'\\]"):
        collect.run_info(run, ["pq"])


def test_collect_records_an_ensembles_members_and_seed_label(tmp_path):
    """A histoseg-eval run of an ensemble: summary.json's checkpoint list becomes the run's ``members`` and
    ``--seeds 0+1+2`` labels it (the eval's own config holds the evaluation's seed, not the members')."""
    collect = load_experiment_script("collect")
    run = tmp_path / "ens"
    run.mkdir()
    members = ["/x/a/epoch_011.ckpt", "/x/b/epoch_007.ckpt"]
    (run / "summary.json").write_text(json.dumps({"n_images": 3, "mean": {"dice": 0.9}, "checkpoint": members}))
    (run / "config.yaml").write_text("seed: 42\n")
    assert collect.run_info(run, ["dice"])["members"] == members
    assert collect.seed_label("0+1+2") == "0+1+2" and collect.seed_label("3") == 3
    single = tmp_path / "single"
    single.mkdir()
    (single / "summary.json").write_text(json.dumps({"n_images": 3, "mean": {"dice": 0.9}, "checkpoint": "/x/a.ckpt"}))
    assert collect.run_info(single, ["dice"])["members"] is None


def test_collect_labels_an_eval_run_with_its_checkpoints_training_seed(tmp_path, capsys):
    """A histoseg-eval run's config holds the evaluation's seed (42); its label is the seed the checkpoint was
    trained with, read from the checkpoint's run folder (an ensemble's members joined); without that folder the
    evaluation's seed stays, with a warning naming the checkpoint."""
    collect = load_experiment_script("collect")
    ckpts = []
    for seed in (1, 2):
        train_run = tmp_path / "train" / f"seed_{seed}"
        (train_run / "checkpoints").mkdir(parents=True)
        (train_run / "config.yaml").write_text(f"seed: {seed}\nmodel: x\n")
        ckpts.append(str(train_run / "checkpoints" / "epoch_009.ckpt"))

    def eval_run(name, ckpt):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"n_images": 3, "mean": {"dice": 0.9}, "checkpoint": ckpt}))
        (run / "config.yaml").write_text("seed: 42\n")
        return run

    assert collect.run_info(eval_run("raw", ckpts[1]), ["dice"])["seed"] == 2
    assert collect.run_info(eval_run("ens", ckpts), ["dice"])["seed"] == "1+2"
    assert collect.run_info(eval_run("moved", str(tmp_path / "gone" / "checkpoints" / "a.ckpt")), ["dice"])["seed"] == 42
    assert "no training seed found beside checkpoint" in capsys.readouterr().err


def test_cross_validation_folds_are_labelled_as_folds(tmp_path):
    """A leave-one-case-out result (``folds``: the held-out group of each value) is shown as a mean over folds,
    with the per-fold values named by their group; a folds list of the wrong length names the file."""
    res = dict(FIXTURE, seeds=[0, 0, 0], folds=["Case_A", "Case_B", "Case_C"])
    root = project(tmp_path, {"cv": res})
    mt.update(root)
    text = (root / "experiments" / "cv" / "README.md").read_text()
    assert "0.600 ± 0.100 (n=3 folds)" in text and "(n=3)" not in text
    assert "Per fold (held-out Case_A, Case_B, Case_C):" in text and "Per seed" not in text
    assert "(n=3 folds)" in (root / "README.md").read_text()
    (root / "experiments" / "cv" / "results.json").write_text(json.dumps(dict(res, folds=["Case_A", "Case_B"])))
    with pytest.raises(mt.ResultsError, match=r"cv/results.json: metrics.dice has 3 values for 2 folds"):
        mt.update(root)


def test_collect_labels_runs_with_their_fold_in_run_order(tmp_path, monkeypatch):
    """``collect.py --folds``: each label follows its run through the sorting of --runs into results.json."""
    collect = load_experiment_script("collect")
    runs = []
    for case, dice in (("Case_11", 0.6), ("Case_10", 0.5)):  # given out of order
        run = tmp_path / "loco" / case / "seed_0"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"n_images": 3, "mean": {"dice": dice}}))
        (run / "config.yaml").write_text("seed: 0\n")
        runs.append(run)
    monkeypatch.setattr(collect, "__file__", str(tmp_path / "experiments" / "collect.py"))
    collect.main(["cv", "--runs", *map(str, runs), "--metrics", "dice", "--hardware", "h", "--budget", "b",
                  "--command", "c", "--folds", "Case_11", "Case_10"])
    out = json.loads((tmp_path / "experiments" / "cv" / "results.json").read_text())
    assert out["folds"] == ["Case_10", "Case_11"] and out["metrics"]["dice"]["per_seed"] == [0.5, 0.6]
    assert [r["fold"] for r in out["runs"]] == ["Case_10", "Case_11"]
    with pytest.raises(SystemExit, match="--folds has 1 values for 2 runs"):
        collect.main(["cv", "--runs", *map(str, runs), "--metrics", "dice", "--hardware", "h", "--budget", "b",
                      "--command", "c", "--folds", "Case_10"])


def test_collect_keeps_each_runs_per_image_csv_for_later_paired_comparisons(tmp_path, monkeypatch):
    """collect.py copies every run's per_image.csv into the experiment folder (named by seed) and lists it in
    results.json; paired.py reads such a copy as a baseline; a re-collect replaces the copies, stale ones included."""
    collect = load_experiment_script("collect")
    paired = load_experiment_script("paired")
    runs = []
    for seed, aji in ((2, 0.7), (1, 0.6)):
        run = tmp_path / "runs" / f"seed_{seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"n_images": 2, "mean": {"aji": aji}}))
        (run / "config.yaml").write_text(f"seed: {seed}\n")
        (run / "per_image.csv").write_text(f"case_id,aji\na,{aji - 0.1}\nb,{aji + 0.1}\n")
        runs.append(run)
    monkeypatch.setattr(collect, "__file__", str(tmp_path / "experiments" / "collect.py"))
    rest = ["--metrics", "aji", "--hardware", "h", "--budget", "b", "--command", "c"]
    collect.main(["x", "--runs", *map(str, runs), *rest])
    folder = tmp_path / "experiments" / "x"
    out = json.loads((folder / "results.json").read_text())
    assert out["per_image"] == {"seed_1": "per_image/seed_1.csv", "seed_2": "per_image/seed_2.csv"}
    assert (folder / "per_image" / "seed_2.csv").read_text() == (runs[0] / "per_image.csv").read_text()
    # a later comparison reads the kept copy as its baseline, not the run folder
    res = paired.main(["--base", str(folder / "per_image" / "seed_1.csv"), "--new", str(runs[0]), "--metrics", "aji"])
    assert res["pooled"]["aji"]["diff"] == pytest.approx(0.1) and res["pooled"]["aji"]["better"] == 2
    # re-collect with seed 1 only: seed 2's copy goes
    collect.main(["x", "--runs", str(runs[1]), *rest])
    assert sorted(p.name for p in (folder / "per_image").iterdir()) == ["seed_1.csv"]
    assert json.loads((folder / "results.json").read_text())["per_image"] == {"seed_1": "per_image/seed_1.csv"}


def test_collect_keep_collected_adds_seeds_to_an_earlier_results_file(tmp_path, monkeypatch):
    """``--keep-collected``: seeds collected before (their run folders gone) keep their values, run entries and
    per-image copies; new seeds join them in seed order; a new run of an old seed replaces it; a metric the old
    runs never had is an error naming the file, and nothing is written."""
    collect = load_experiment_script("collect")
    monkeypatch.setattr(collect, "__file__", str(tmp_path / "experiments" / "collect.py"))

    def run(seed, dice, aji):
        d = tmp_path / "runs" / f"seed_{seed}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps({"n_images": 2, "mean": {"dice": dice, "aji": aji}}))
        (d / "config.yaml").write_text(f"seed: {seed}\n")
        (d / "per_image.csv").write_text(f"case_id,dice\na,{dice}\n")
        return d

    rest = ["--hardware", "h", "--budget", "b", "--command", "c"]
    old = run(1, 0.5, 0.3)
    collect.main(["x", "--runs", str(old), "--metrics", "dice", *rest])
    folder = tmp_path / "experiments" / "x"
    shutil.rmtree(old)  # the earlier run folder is gone
    new = [run(2, 0.7, 0.4), run(0, 0.6, 0.2)]
    collect.main(["x", "--runs", *map(str, new), "--metrics", "dice", "--keep-collected", *rest])
    out = json.loads((folder / "results.json").read_text())
    assert out["seeds"] == [0, 1, 2] and out["metrics"]["dice"]["per_seed"] == [0.6, 0.5, 0.7]
    assert [r["seed"] for r in out["runs"]] == [0, 1, 2] and out["runs"][1]["dir"] == str(old)
    assert sorted(out["per_image"]) == ["seed_0", "seed_1", "seed_2"]
    assert (folder / "per_image" / "seed_1.csv").read_text() == "case_id,dice\na,0.5\n"
    # a new run of seed 1 replaces the kept one
    collect.main(["x", "--runs", str(run(1, 0.9, 0.5)), "--metrics", "dice", "--keep-collected", *rest])
    out = json.loads((folder / "results.json").read_text())
    assert out["seeds"] == [0, 1, 2] and out["metrics"]["dice"]["per_seed"] == [0.6, 0.9, 0.7]
    # aji was never collected for seeds 0 and 2: refused, results.json untouched
    before = (folder / "results.json").read_text()
    with pytest.raises(SystemExit, match=r"x/results.json: seed 0 has no kept value of aji"):
        collect.main(["x", "--runs", str(run(1, 0.9, 0.5)), "--metrics", "dice", "aji", "--keep-collected", *rest])
    assert (folder / "results.json").read_text() == before
    # without the flag the old seeds go, as before
    collect.main(["x", "--runs", str(run(1, 0.9, 0.5)), "--metrics", "dice", *rest])
    assert json.loads((folder / "results.json").read_text())["seeds"] == [1]


def test_headline_table_lists_the_chosen_recipes_in_rank_order(tmp_path):
    """Only experiments with a ``headline`` get a row, in ``rank`` order, with their chosen metrics, targets and
    the source's numbers; the headline markers are optional and nothing else between them survives."""
    second = {**FIXTURE, "headline": {"task": "Fixture nuclei", "rank": 2, "metrics": ["dice", "aji"]}}
    first = {**FIXTURE, "seeds": None, "folds": ["A", "B", "C"],
             "headline": {"task": "Fixture cases", "rank": 1, "metrics": ["aji"]}}
    root = project(tmp_path, {"alpha": second, "beta": first, "gamma": FIXTURE})
    assert mt.main(["--root", str(root)]) == 0  # no headline markers: only the results table is written
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("intro stays\n", "intro stays\n<!-- headline:start -->\nstale\n"
                                                 "<!-- headline:end -->\n"))
    assert mt.update(root, check=True) == [readme]
    mt.update(root)
    text = readme.read_text()
    head = text[text.index("<!-- headline:start -->"):text.index("<!-- headline:end -->")]
    rows = [line for line in head.splitlines() if line.startswith("| Fixture")]
    assert rows == [
        "| Fixture cases | [beta](experiments/beta/) | aji 0.200 ± 0.000 | 3 folds | aji 0.300 ✗ |  |",
        "| Fixture nuclei | [alpha](experiments/alpha/) | dice 0.600 ± 0.100; aji 0.200 ± 0.000 | 3 seeds | "
        "dice 0.550 ✓; aji 0.300 ✗ | dice 0.550 |",
    ]
    assert "stale" not in text and "gamma" not in head
    assert mt.update(root, check=True) == []


@pytest.mark.parametrize("headline,message", [
    ({"task": "x", "rank": 1, "metrics": ["pq"]}, r"headline metric\(s\) \['pq'\] are not in 'metrics'"),
    ({"task": "x", "metrics": ["dice"]}, "'headline' must be"),
    ({"task": "x", "rank": True, "metrics": ["dice"]}, "'headline' must be"),
])
def test_a_malformed_headline_names_the_file(tmp_path, headline, message):
    root = project(tmp_path, {"delta": {**FIXTURE, "headline": headline}})
    with pytest.raises(mt.ResultsError, match=message) as e:
        mt.update(root)
    assert "delta/results.json" in str(e.value)
