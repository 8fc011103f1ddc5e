"""Checkpoint ensembles: ``EnsembleNet``, ``restore_models`` and ``histoseg-eval`` / ``histoseg-predict`` with a
list of checkpoints (raw outputs averaged, held-out checks, post-processing tuned for the ensemble)."""
import csv
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from histoseg.data.io import DataError
from histoseg.models.ensemble import EnsembleNet
from histoseg.models.loading import load_checkpoint
from histoseg.tasks.evaluate import evaluate
from histoseg.tasks.restore import checkpoint_paths, postprocess_overrides, restore_models, restore_task
from histoseg.tasks.train import train
from histoseg.tasks.utils import ConfigError
from tests.conftest import compose_cfg

pytestmark = pytest.mark.xdist_group("ensemble")  # module-scoped training fixture: one worker

DATA = ["dataset=synthetic", "dataset.reader.n_train=4", "dataset.reader.n_val=2", "dataset.reader.n_test=3",
        "dataset.reader.image_shape=[96,96]"]
EVAL_BASE = [*DATA, "trainer.precision=32-true", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny runs on the same split with different seeds (2 epochs each, a few seconds)."""
    out = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"member{seed}")
        cfg = compose_cfg(d, "dataset.reader.n_test=3", "trainer.max_epochs=2", "dataset.samples_per_epoch=16",
                          "optimizer.optimizer.lr=3e-3", f"seed={seed}", "++dataset.split.seed=0")
        metrics, obj = train(cfg)
        out.append({"ckpt": obj["trainer"].checkpoint_callback.best_model_path,
                    "metrics": {k: float(v) for k, v in metrics.items()}})
    return out


def eval_cfg(tmp_path, *overrides):
    return compose_cfg(tmp_path, *overrides, base=EVAL_BASE, config_name="eval")


def ckpt_list(*paths) -> str:
    return "ckpt_path=[" + ",".join(str(p) for p in paths) + "]"


def test_ensemble_net_averages_raw_outputs_with_normalised_weights():
    x = torch.randn(2, 3, 8, 8)
    a, b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
    assert torch.allclose(EnsembleNet([a, b])(x), (a(x) + b(x)) / 2, atol=1e-6)
    assert torch.allclose(EnsembleNet([a, b], weights=[3, 1])(x), 0.75 * a(x) + 0.25 * b(x), atol=1e-6)
    assert torch.allclose(EnsembleNet([a])(x), a(x))
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="ensemble weights"):
            EnsembleNet([a, b], weights=bad)
    with pytest.raises(ValueError, match="at least one"):
        EnsembleNet([])


def test_checkpoint_paths_take_one_path_or_a_list_without_repeats(tmp_path):
    from omegaconf import OmegaConf

    assert checkpoint_paths("a.ckpt") == ["a.ckpt"]
    assert checkpoint_paths(OmegaConf.create({"p": ["a.ckpt", "b.ckpt"]}).p) == ["a.ckpt", "b.ckpt"]
    with pytest.raises(ConfigError, match="twice"):
        checkpoint_paths(["a.ckpt", "./a.ckpt"])
    with pytest.raises(ConfigError, match="names no checkpoint"):
        checkpoint_paths([])


def test_ensemble_logits_are_the_mean_of_its_members_whole_image_logits(members):
    """Tiled blending and TTA are linear in the network's output, so the ensemble's whole-image logits equal the
    mean of the members' whole-image logits (the members are applied tile by tile inside one pass)."""
    paths = [m["ckpt"] for m in members]
    image = torch.rand(3, 96, 80)
    singles = [restore_task(p, inference={"tta": "flip"})[0].predict_logits(image) for p in paths]
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)  # two different models
    ens, ckpts = restore_models(paths, inference={"tta": "flip"})
    assert isinstance(ens.net, EnsembleNet) and len(ens.net.nets) == 2 and len(ckpts) == 2
    assert torch.allclose(ens.predict_logits(image), (singles[0] + singles[1]) / 2, atol=1e-5)


def test_ensemble_of_one_model_twice_reproduces_that_model(members, tmp_path):
    """Two copies of one checkpoint: the mean of identical outputs is the output, so every test number is the
    single model's (the ensemble path changes nothing but the averaging)."""
    copy = tmp_path / "copy.ckpt"
    shutil.copy(members[0]["ckpt"], copy)
    metrics, _ = evaluate(eval_cfg(tmp_path / "ens", ckpt_list(members[0]["ckpt"], copy)))
    for k in ("test/dice", "test/iou", "test/aji", "test/pq"):
        assert float(metrics[k]) == pytest.approx(members[0]["metrics"][k], abs=1e-5), k
    summary = json.loads((tmp_path / "ens" / "summary.json").read_text())
    assert isinstance(summary["checkpoint"], list) and len(summary["checkpoint"]) == 2


def test_eval_tunes_the_ensembles_postprocessing_on_validation_without_touching_the_checkpoints(members, tmp_path):
    paths = [m["ckpt"] for m in members]
    before = [open(p, "rb").read() for p in paths]
    metrics, obj = evaluate(eval_cfg(tmp_path, ckpt_list(*paths), "tune_postprocess.enabled=true",
                                     "tune_postprocess.grid={threshold:[0.3,0.5],min_size:[5,20]}"))
    tuning = json.loads((tmp_path / "postprocess_tuning.json").read_text())
    assert tuning["val_images"] == ["syn-val-0000", "syn-val-0001"]  # validation images, never the test ones
    assert len(tuning["table"]) == 4
    best = max(tuning["table"], key=lambda r: r["aji_pq"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["postprocess"]["threshold"] == best["threshold"] == tuning["best"]["threshold"]
    assert summary["postprocess"]["min_size"] == best["min_size"]
    stored = load_checkpoint(paths[0])["histoseg"]["inference"]
    assert summary["inference"].get("autocast") == stored.get("autocast")  # tuning's temporary setting is undone
    assert [open(p, "rb").read() for p in paths] == before  # the members' stored settings are unchanged
    rows = list(csv.DictReader(open(tmp_path / "per_image.csv")))
    assert [r["case_id"] for r in rows] == ["syn-test-0000", "syn-test-0001", "syn-test-0002"]
    # the tuned settings live in no checkpoint: postprocess_from= reads them back from either output file
    for src in ("postprocess_tuning.json", "summary.json"):
        again, _ = evaluate(eval_cfg(tmp_path / f"from_{src}", ckpt_list(*paths), f"postprocess_from={tmp_path / src}"))
        for k in ("test/dice", "test/aji", "test/pq"):
            assert float(again[k]) == pytest.approx(float(metrics[k]), abs=1e-6), (src, k)
        assert json.loads((tmp_path / f"from_{src}" / "summary.json").read_text())["postprocess"] == summary["postprocess"]
    # explicit postprocess.* still win over the file
    cfg = eval_cfg(tmp_path / "o", ckpt_list(*paths), f"postprocess_from={tmp_path / 'summary.json'}",
                   "postprocess.min_size=77")
    assert postprocess_overrides(cfg)["min_size"] == 77
    assert postprocess_overrides(cfg)["threshold"] == best["threshold"]


def test_postprocess_from_names_a_missing_or_unfit_file(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"mean": {}}))
    (tmp_path / "bad.json").write_text("{")
    for name, msg in (("missing.json", "no such file"), ("x.json", "holds no post-processing"),
                      ("bad.json", "not a JSON file")):
        cfg = eval_cfg(tmp_path, "ckpt_path=a.ckpt", f"postprocess_from={tmp_path / name}")
        with pytest.raises(ConfigError, match=f"postprocess_from=.*{name}.*{msg}"):
            postprocess_overrides(cfg)


def test_a_member_that_trained_on_the_test_images_is_refused(members, tmp_path):
    """A member whose stored split has a test image in its training (or validation) images is named."""
    ckpt = load_checkpoint(members[1]["ckpt"])
    split = ckpt["HistoDataModule"]["split"]
    split["train"] = [*split["train"], split["test"][0]]
    leaky = tmp_path / "leaky.ckpt"
    torch.save(ckpt, leaky)
    with pytest.raises(ConfigError, match=r"leaky\.ckpt has 1 of the 3 images scored here in its train split"):
        evaluate(eval_cfg(tmp_path / "a", ckpt_list(members[0]["ckpt"], leaky)))
    # a single checkpoint scored on the dataset config's split instead of its own is checked the same way
    with pytest.raises(ConfigError, match=r"leaky\.ckpt has 1 of the 3 images scored"):
        evaluate(eval_cfg(tmp_path / "single", f"ckpt_path={leaky}", "use_checkpoint_split=false"))
    split["train"].pop()
    split["val"] = [*split["val"], split["test"][1]]
    torch.save(ckpt, leaky)
    with pytest.raises(ConfigError, match="in its val split"):
        evaluate(eval_cfg(tmp_path / "b", ckpt_list(members[0]["ckpt"], leaky)))
    # tuning on validation images a member trained on is refused too
    split["val"].pop()
    split["train"] = [*split["train"], "syn-val-0001"]
    torch.save(ckpt, leaky)
    with pytest.raises(ConfigError, match="images tuned on here in its train split"):
        evaluate(eval_cfg(tmp_path / "c", ckpt_list(members[0]["ckpt"], leaky), "tune_postprocess.enabled=true"))
    assert not (tmp_path / "c" / "per_image.csv").exists()


def test_members_with_other_outputs_cannot_join(members, tmp_path):
    ckpt = load_checkpoint(members[1]["ckpt"])
    ckpt["histoseg"]["model_config"]["head_activations"] = {"dist": "none"}  # same weights, other meaning
    odd = tmp_path / "odd.ckpt"
    torch.save(ckpt, odd)
    with pytest.raises(ConfigError, match=r"odd\.ckpt cannot join an ensemble .* head_activations"):
        restore_models([members[0]["ckpt"], odd])
    # weights that do not fit the stored model config: named, not a bare state_dict error
    ckpt = load_checkpoint(members[1]["ckpt"])
    ckpt["histoseg"]["model_config"]["num_classes"] = 4
    torch.save(ckpt, odd)
    with pytest.raises(DataError, match=r"odd\.ckpt: checkpoint weights do not fit the stored model config"):
        restore_models([members[0]["ckpt"], odd])


def test_tuning_needs_a_tunable_postprocessing(members, tmp_path):
    with pytest.raises(ConfigError, match="tune_postprocess.enabled=true tunes the watershed"):
        evaluate(eval_cfg(tmp_path, ckpt_list(*[m["ckpt"] for m in members]), "tune_postprocess.enabled=true",
                          "postprocess.instances=none"))


def test_predict_and_the_eval_command_take_an_ensemble(members, tmp_path):
    from histoseg.cli import dataset_from_checkpoint
    from histoseg.tasks.predict import predict

    paths = [m["ckpt"] for m in members]
    assert dataset_from_checkpoint([ckpt_list(*paths)]) == "synthetic"
    assert dataset_from_checkpoint([f"ckpt_path=['{paths[0]}','{paths[1]}']"]) == "synthetic"
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    cfg = compose_cfg(tmp_path / "pred", ckpt_list(*paths), f"input={folder}", f"output_dir={tmp_path / 'pred'}",
                      "mpp=0.5", "progress=false", base=[], config_name="predict")
    summary, _ = predict(cfg)
    assert summary["n_ok"] == 2 and summary["n_errors"] == 0
    for i in range(2):
        mask = cv2.imread(str(tmp_path / "pred" / "masks" / f"img{i}.png"), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.shape[:2] == (70, 90)
