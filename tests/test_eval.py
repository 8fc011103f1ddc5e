"""histoseg-eval end to end: a checkpoint trained in the test, scored again by evaluate(cfg)."""
import csv
import json

import cv2
import pytest
from hydra.errors import ConfigCompositionException

from histoseg.tasks.evaluate import evaluate
from histoseg.tasks.train import train
from histoseg.tasks.utils import ConfigError
from tests.conftest import compose_cfg

# its module-scoped fixtures are built once: keep the module on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("eval")

DATA = ["dataset=synthetic", "dataset.reader.n_train=4", "dataset.reader.n_val=2", "dataset.reader.n_test=3",
        "dataset.reader.image_shape=[96,96]"]
EVAL_BASE = [*DATA, "trainer.precision=32-true", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (2 epochs, ~3 s): its best checkpoint and its own test metrics."""
    out = tmp_path_factory.mktemp("train")
    cfg = compose_cfg(out, "dataset.reader.n_test=3", "trainer.max_epochs=2", "dataset.samples_per_epoch=16",
                      "optimizer.optimizer.lr=3e-3")
    metrics, obj = train(cfg)
    best = obj["trainer"].checkpoint_callback.best_model_path
    return {"dir": out, "ckpt": best, "metrics": {k: float(v) for k, v in metrics.items()}}


def eval_cfg(tmp_path, *overrides):
    return compose_cfg(tmp_path, *overrides, base=EVAL_BASE, config_name="eval")


def test_eval_reproduces_the_training_test_and_writes_reports_and_figures(trained, tmp_path):
    metrics, obj = evaluate(eval_cfg(tmp_path, f"ckpt_path={trained['ckpt']}"))
    for k in ("test/dice", "test/iou", "test/acc", "test/aji", "test/pq"):
        assert float(metrics[k]) == pytest.approx(trained["metrics"][k], abs=1e-6), k
    rows = list(csv.DictReader(open(tmp_path / "per_image.csv")))
    assert [r["case_id"] for r in rows] == ["syn-test-0000", "syn-test-0001", "syn-test-0002"]
    assert {"dice", "iou", "acc", "aji", "aji_plus", "pq", "dq", "sq", "obj_f1"} <= set(rows[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["split"] == "test" and summary["split_source"] == "checkpoint"
    dice = [float(r["dice"]) for r in rows]
    assert summary["mean"]["dice"] == pytest.approx(sum(dice) / 3, abs=1e-5)
    assert summary["median"]["dice"] == pytest.approx(sorted(dice)[1], abs=1e-5)
    assert summary["checkpoint"].endswith(".ckpt")
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["test"] == [r["case_id"] for r in rows]
    figs = tmp_path / "figures" / "test"
    assert sorted(p.name for p in figs.glob("*.png")) == sorted(
        f"{r['case_id']}{suffix}.png" for r in rows for suffix in ("", "_overlay"))
    img = cv2.imread(str(figs / "syn-test-0000.png"))
    assert img is not None and img.shape[1] > 2 * img.shape[0]  # three panels side by side
    assert cv2.imread(str(figs / "syn-test-0000_overlay.png")).shape[:2] == (96, 96)  # full resolution


def test_eval_on_val_split_with_overrides_and_panel_cap(trained, tmp_path):
    metrics, _ = evaluate(eval_cfg(tmp_path, f"ckpt_path={trained['ckpt']}", "split=val", "inference.tta=flip",
                                   "postprocess.instances=none", "callbacks.figures.max_panels=1",
                                   "callbacks.figures.overlays=false"))
    rows = list(csv.DictReader(open(tmp_path / "per_image.csv")))
    assert [r["case_id"] for r in rows] == ["syn-val-0000", "syn-val-0001"]
    assert "aji" not in rows[0] and "test/aji" not in metrics  # no instances after the override
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["inference"]["tta"] == "flip" and summary["postprocess"]["instances"] == "none"
    assert summary["inference"]["tile_shape"] == [64, 64]  # the rest kept from the checkpoint
    assert [p.name for p in (tmp_path / "figures" / "test").glob("*.png")] == ["syn-val-0000.png"]


def test_eval_on_all_images_scores_every_split(trained, tmp_path):
    """``split=all``: a model on an unseen source is scored on every image of the dataset."""
    metrics, _ = evaluate(eval_cfg(tmp_path, f"ckpt_path={trained['ckpt']}", "split=all", "postprocess.instances=none",
                                   "callbacks.figures.max_panels=0"))
    rows = list(csv.DictReader(open(tmp_path / "per_image.csv")))
    ids = [r["case_id"] for r in rows]
    assert len(ids) == 4 + 2 + 3 and len(set(ids)) == 9
    assert {i.split("-")[1] for i in ids} == {"train", "val", "test"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_images"] == 9 and summary["split"] == "all"
    assert float(metrics["test/dice"]) == pytest.approx(sum(float(r["dice"]) for r in rows) / 9, abs=1e-5)


def test_dataset_and_ckpt_path_are_mandatory(trained, tmp_path):
    with pytest.raises(ConfigCompositionException, match="dataset"):
        compose_cfg(tmp_path, f"ckpt_path={trained['ckpt']}", base=[], config_name="eval")
    with pytest.raises(ConfigError, match=r"missing mandatory value\(s\): ckpt_path"):
        evaluate(eval_cfg(tmp_path))


def test_class_count_mismatch_is_one_clear_sentence(tmp_path):
    from tests.helpers_ckpt import nearest_palette_colour, write_checkpoint

    four = write_checkpoint(tmp_path / "four.ckpt", 4, nearest_palette_colour, {"instances": "none"})
    with pytest.raises(ConfigError, match=r"four\.ckpt: the model has 4 classes but dataset 'synthetic' has 2"):
        evaluate(eval_cfg(tmp_path, f"ckpt_path={four}"))


def test_training_writes_curves_figure(trained):
    png = trained["dir"] / "figures" / "curves.png"
    assert png.is_file() and cv2.imread(str(png)) is not None
    assert len(list((trained["dir"] / "figures" / "test").glob("*_overlay.png"))) == 3


def test_checkpoint_stores_the_training_dataset_for_predict_and_eval(trained):
    from histoseg.data.stain import check_reference
    from histoseg.models.loading import load_checkpoint

    ckpt = load_checkpoint(trained["ckpt"])  # weights_only=True
    info = dict(ckpt["histoseg"]["dataset"])
    ref = check_reference(info.pop("stain_ref"))  # the training images' colours, for inference.stain_norm
    assert info == {"name": "synthetic", "mpp": 0.5, "class_names": ["background", "nucleus"]}
    assert ref["pixels"] > 0 and 0 < ref["mean"][0] < 100
    assert ckpt["HistoDataModule"]["split"]["test"] == ["syn-test-0000", "syn-test-0001", "syn-test-0002"]


def test_eval_command_defaults_to_the_checkpoints_own_dataset(trained, tmp_path):
    """``histoseg-eval ckpt_path=X`` without ``dataset=``: the command fills in the training data's name from the
    checkpoint; an explicit ``dataset=`` wins; an unreadable checkpoint leaves it to the task's own error."""
    from histoseg.cli import dataset_from_checkpoint

    ck = trained["ckpt"]
    assert dataset_from_checkpoint([f"ckpt_path={ck}", "split=val"]) == "synthetic"
    assert dataset_from_checkpoint([f"ckpt={ck}"]) == "synthetic"
    assert dataset_from_checkpoint([f"ckpt_path={ck}", "dataset=monuseg"]) is None
    assert dataset_from_checkpoint(["split=val"]) is None
    bad = tmp_path / "not_a.ckpt"
    bad.write_bytes(b"junk")
    assert dataset_from_checkpoint([f"ckpt_path={bad}"]) is None
    assert dataset_from_checkpoint([f"ckpt_path={tmp_path / 'missing.ckpt'}"]) is None


def test_eval_stain_norm_computes_a_missing_reference_from_the_checkpoints_training_split(trained, tmp_path):
    """``inference.stain_norm=reinhard`` on a checkpoint from before references were stored: histoseg-eval
    recomputes it from the checkpoint's own training images (equal to what training stores), scores the same as
    with the stored one, and records it in summary.json for ``stain_ref_from``."""
    import torch

    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    stored = ckpt["histoseg"]["dataset"].pop("stain_ref")
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    quiet = ["inference.stain_norm=reinhard", "callbacks.figures.max_panels=0", "callbacks.figures.overlays=false"]
    m_old, _ = evaluate(eval_cfg(tmp_path / "old", f"ckpt_path={old}", *quiet))
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert summary["inference"]["stain_norm"] == "reinhard"
    assert summary["stain_ref"]["mean"] == pytest.approx(stored["mean"], abs=1e-9)
    assert summary["stain_ref"]["std"] == pytest.approx(stored["std"], abs=1e-9)
    m_new, _ = evaluate(eval_cfg(tmp_path / "new", f"ckpt_path={trained['ckpt']}", *quiet))
    m_from, _ = evaluate(eval_cfg(tmp_path / "from", f"ckpt_path={old}", "use_checkpoint_split=false",
                                  f"stain_ref_from={tmp_path / 'old' / 'summary.json'}", *quiet))
    for k in ("test/dice", "test/aji"):
        assert float(m_new[k]) == pytest.approx(float(m_old[k]), abs=1e-9)
        assert float(m_from[k]) == pytest.approx(float(m_old[k]), abs=1e-9)
    with pytest.raises(ConfigError, match="stores no stain reference.*stain_ref_from"):
        evaluate(eval_cfg(tmp_path / "none", f"ckpt_path={old}", "use_checkpoint_split=false", *quiet))
    with pytest.raises(ConfigError, match="stain_norm='macenko' is not"):
        evaluate(eval_cfg(tmp_path / "bad", f"ckpt_path={old}", "inference.stain_norm=macenko"))


def test_eval_save_maps_writes_each_images_maps_matching_its_scores(trained, tmp_path):
    """``save_maps=true``: one ``maps/<case>.npz`` per scored image, holding the maps the scores came from:
    the saved instances reproduce the CSV's AJI, and post-processing the saved float16 maps again gives the saved
    class map on almost every pixel."""
    import numpy as np

    from histoseg.inference.postprocess import PostProcessor
    from histoseg.metrics.instance import aji

    evaluate(eval_cfg(tmp_path, f"ckpt_path={trained['ckpt']}", "save_maps=true", "callbacks.figures.max_panels=0"))
    rows = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "per_image.csv"))}
    files = sorted((tmp_path / "maps").glob("*.npz"))
    assert [f.stem for f in files] == sorted(rows)
    assert not list((tmp_path / "maps").glob(".*"))  # no temporary files left behind
    pp = PostProcessor(**json.loads((tmp_path / "summary.json").read_text())["postprocess"])
    for f in files:
        z = np.load(f)
        assert {"probs", "pred_labels", "pred_instances", "true_mask", "true_instances"} <= set(z.files)
        probs = z["probs"]
        assert probs.dtype == np.float16 and probs.shape == (1, 96, 96)  # binary model: one sigmoid channel
        assert 0 <= probs.min() and probs.max() <= 1
        assert z["true_instances"].shape == z["pred_instances"].shape == (96, 96)
        assert set(np.unique(z["true_mask"])) <= {0, 1}
        assert aji(z["true_instances"], z["pred_instances"]) == pytest.approx(float(rows[f.stem]["aji"]), abs=1e-5)
        # the float16 maps are close enough to the float32 ones that the post-processing agrees on most pixels
        again = pp(probs.astype(np.float32))
        assert (again["labels"] == z["pred_labels"]).mean() > 0.99
