"""The benchmark suite in its tiny mode: what it measures is correct (no test asserts a time).

* the HDF5-store and folder loaders of the data benchmark give identical patches for the same keys;
* the training benchmark trains the real task through a Lightning Trainer and reports consistent ratios;
* the inference benchmark computes the histoseg-vs-MONAI difference (and it is ~0 in fp32);
* the growth probe writes into the memmap; ``benchmarks.run`` goals and ``benchmarks.table`` work on the results;
* the speed options it relies on: ``batch_size="auto"`` tiles, ``pin_memory=None``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks import data_pipeline, growth, inference, run, table, training, wsi_bench
from benchmarks.common import Options

# its module-scoped fixtures are built once: keep the module on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("benchmarks")


@pytest.fixture(scope="module")
def opts(tmp_path_factory) -> Options:
    base = tmp_path_factory.mktemp("bench")
    return Options(quick=True, device="cpu", cache_dir=str(base / "cache"), work_dir=str(base / "work"))


@pytest.fixture(scope="module")
def quick_inference(opts) -> dict:
    return inference.run(opts)


@pytest.fixture(scope="module")
def quick_growth(opts) -> dict:
    return growth.run(Options(**{**opts.__dict__, "extra": {"sizes": [192, 320]}}))


@pytest.fixture(scope="module")
def quick_wsi(opts) -> dict:
    extra = {"ratio_side": 1024, "sizes": [768, 1280], "models": ["pointwise"], "tissue": "synthetic", "workers": 1}
    return wsi_bench.run(Options(**{**opts.__dict__, "extra": extra}))


@pytest.fixture(scope="module")
def quick_data(opts, data_dir) -> dict:
    return data_pipeline.run(opts)


@pytest.fixture(scope="module")
def quick_training(opts, data_dir) -> dict:
    return training.run(Options(**{**opts.__dict__, "extra": {"in_process": True, "variants": ["bf16_gpu_aug"]}}))


@pytest.mark.data
def test_store_and_folder_loaders_give_identical_patches_for_the_same_keys(opts, tmp_path, data_dir):
    from histoseg.data.datasets import PatchDataset

    s = data_pipeline.settings(opts)
    dm, _ = data_pipeline.datamodule(s, opts, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    folder = dm.train_set.source
    store, _ = data_pipeline.whole_image_store(dm, opts)
    same = data_pipeline.SameKeysStoreSource(store, folder)
    aug = data_pipeline.build_aug("light", "aug", tmp_path)
    a = PatchDataset(folder, dm.patch_shape, 32, aug, seed=5)
    b = PatchDataset(same, dm.patch_shape, 32, aug, seed=5)
    assert data_pipeline.same_patches(a, b, 12)
    # through the DataModule's loader with a worker (its own h5py handle): identical batches
    da = data_pipeline.loader(dm, folder, aug, 1)
    ba = next(iter(da))
    bb = next(iter(data_pipeline.loader(dm, same, aug, 1)))
    assert torch.equal(ba["image"], bb["image"]) and torch.equal(ba["mask"], bb["mask"])
    assert ba["case_id"] == bb["case_id"]
    # the check can fail: other keys give other patches
    assert not torch.equal(a[(0, 3)]["image"], b[(1, 3)]["image"])


@pytest.mark.data
def test_data_benchmark_measures_every_source_aug_and_worker_count(quick_data):
    s = quick_data["settings"]
    assert quick_data["same_patches"]["identical"] is True
    cells = {(r["source"], r["aug"], r["gpu_aug"], r["workers"]) for r in quick_data["rows"]}
    for src in ("folder", "store", "store_patches"):
        for aug in s["augs"]:
            for w in s["workers"]:
                assert (src, aug, None, w) in cells
    assert all(np.isfinite(r["patches_per_s"]) and r["patches_per_s"] > 0 for r in quick_data["rows"])
    for p in quick_data["pairs"]:
        assert p["store_vs_folder"] == pytest.approx(p["store"] / p["folder"], rel=1e-2)
    assert [g["gpu_aug"] for g in quick_data["gpu_aug_pairs"]] == s["gpu_augs"]


@pytest.mark.data
def test_training_benchmark_trains_the_real_task_and_reports_side_by_side_ratios(quick_training):
    (v,) = quick_training["variants"]
    s = quick_training["settings"]
    assert v["status"] == "ok" and v["gpu_aug"] == "stain" and v["precision"] == "bf16-mixed"
    for k in ("ceiling_img_s_before", "ceiling_img_s_after", "pipeline_img_s", "loader_batches_s"):
        assert np.isfinite(v[k]) and v[k] > 0, k
    assert v["ceiling_img_s"] == pytest.approx((v["ceiling_img_s_before"] + v["ceiling_img_s_after"]) / 2, rel=1e-3)
    assert v["pipeline_vs_ceiling"] == pytest.approx(v["pipeline_img_s"] / v["ceiling_img_s"], rel=1e-2)
    assert v["loader_vs_step"] == pytest.approx(v["loader_batches_s"] / v["step_batches_s"], rel=1e-2)
    assert quick_training["goals"]["pipeline_vs_ceiling_bf16"] is None  # no plain bf16 variant in this run
    assert quick_training["goals"]["loader_vs_step_min"] == v["loader_vs_step"]
    assert s["batch_size"] == v["batch_size"]


def test_inference_benchmark_compares_histoseg_with_monai(quick_inference):
    rows = {r["precision"]: r for r in quick_inference["rows"]}
    assert set(rows) == {"fp32", "bf16"}
    assert rows["fp32"]["max_abs_diff"] < 1e-5  # same model, image and settings: the same output
    assert rows["bf16"]["max_abs_diff"] < 0.05 * rows["bf16"]["output_abs_max"]
    for r in rows.values():
        assert r["outputs_finite"]
        assert r["histoseg_vs_monai"] == pytest.approx(r["monai_s"] / r["histoseg_s"], rel=2e-2)


def test_growth_probe_writes_the_memmap_and_reports_memory(quick_growth):
    rows = quick_growth["rows"]
    assert [r["size"] for r in rows] == [192, 320] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["wrote_into_out"] and r["tail_finite"] and r["peak_heap_growth_mib"] >= 0
        assert r["s_per_mp"] == pytest.approx(r["seconds"] / r["megapixels"], rel=0.05)
    assert rows[0]["time_vs_smallest_per_pixel"] == 1.0


def test_goals_and_readme_table_from_results(quick_inference, quick_growth, tmp_path):
    entries = {"inference": {"result": quick_inference}, "growth": {"result": quick_growth}}
    goals = run.goals(entries, "cpu")
    worst = min(r["histoseg_vs_monai"] for r in quick_inference["rows"])
    assert goals["inference_at_least_monai"]["value"] == worst
    assert goals["inference_at_least_monai"]["hit"] == (worst >= 1)
    assert goals["growth"]["sizes"] == [192, 320]
    data = {"env": {"device": "cpu", "device_name": "test cpu"}, "command": "python -m benchmarks.run",
            "benchmarks": entries, "goals": goals}
    text = table.render({"cpu-test": data})
    assert "Tiled inference" in text and "Cost growth" in text and "| 320 |" in text
    readme = f"intro\n{table.START}\nold\n{table.END}\nafter\n"
    new = table.rewrite(readme, text)
    assert new.startswith("intro\n") and new.endswith("after\n") and "old" not in new
    assert table.rewrite(new, text) == new
    with pytest.raises(ValueError, match="markers"):
        table.rewrite("no markers", text)
    path = tmp_path / "cpu-x.json"
    path.write_text(json.dumps(data))
    (tmp_path / "cpu-x-quick.json").write_text(json.dumps(data))
    assert list(table.load_results(tmp_path)) == ["cpu-x"]


def test_run_rejects_unknown_benchmarks():
    assert run.selected("") == list(run.BENCHMARKS)
    assert run.selected("growth,inference") == ["growth", "inference"]
    with pytest.raises(SystemExit, match="choose from data, training, inference, growth"):
        run.selected("data,gpu")


def test_tiled_predict_auto_batch_size():
    from histoseg.inference.tiled import AUTO_CPU_BATCH, auto_batch_size, batch_from_memory, tiled_predict

    # 1 tile peaks at 300 MB, 2 tiles at 400 MB: 100 MB per tile + 200 MB fixed; half of 2 GB free -> 8 tiles
    assert batch_from_memory(2_000_000_000, 300_000_000, 400_000_000, 0.5, 64) == 8
    assert batch_from_memory(10**12, 3, 4, 0.5, 64) == 64 and batch_from_memory(10, 300, 400) == 1
    net = torch.nn.Conv2d(3, 2, 3, padding=1).eval()
    assert auto_batch_size(net, (64, 64), "cpu") == AUTO_CPU_BATCH
    img = torch.rand(3, 150, 170)
    auto = tiled_predict(img, net, (64, 64), 0.25, batch_size="auto", device="cpu")
    torch.testing.assert_close(auto, tiled_predict(img, net, (64, 64), 0.25, batch_size=AUTO_CPU_BATCH, device="cpu"))
    with pytest.raises(ValueError, match="positive number of tiles or 'auto'"):
        tiled_predict(img, net, (64, 64), 0.25, batch_size=0, device="cpu")


def test_uint8_memmap_tiles_give_the_float_image_result(tmp_path):
    from histoseg.inference import tiled_predict

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (130, 190, 3), dtype=np.uint8)
    net = torch.nn.Conv2d(3, 2, 3, padding=1).eval()
    ref = tiled_predict(torch.from_numpy(u8.transpose(2, 0, 1).copy()).float() / 255, net, (64, 64), 0.3, device="cpu")
    np.save(tmp_path / "u8.npy", u8)
    got = tiled_predict(np.load(tmp_path / "u8.npy", mmap_mode="r"), net, (64, 64), 0.3, device="cpu")
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_pin_memory_defaults_to_cuda_only(make_cfg):
    from histoseg.tasks.train import build_datamodule

    dm = build_datamodule(make_cfg())
    assert dm.pin_memory_cfg is None and dm.pin_memory == torch.cuda.is_available()
    assert build_datamodule(make_cfg("dataset.pin_memory=true")).pin_memory is True
    dm = build_datamodule(make_cfg("dataset.num_workers=1"))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()


def test_compile_option_runs_the_compiled_forward(monkeypatch):
    """``model.compile=true`` (a benchmark variant) calls the compiled net; it used to call ``len()`` on it."""
    import functools

    from histoseg.models import SegmentationTask
    from histoseg.models.backbones.unet import UNet

    calls = []
    eager = functools.partial(torch.compile, backend="eager")  # dynamo tracing only: seconds, not minutes

    def spy(model, **kw):
        calls.append(model)
        return eager(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    task = SegmentationTask(net=UNet(in_channels=3, num_classes=1, depth=2, width=4), compile=True,
                            channels_last=True)
    task.setup("fit")
    x = torch.rand(2, 3, 32, 32)
    out = task(x)
    assert calls == [task.net] and out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out, task.net(x.contiguous(memory_format=torch.channels_last)))


def test_sparse_tile_filter_batches_never_overflow_the_band():
    """A filter that keeps one tile per row makes a batch of 8 span 8 rows: it must be cut, not crash."""
    from histoseg.inference import tiled_predict

    net = torch.nn.Conv2d(3, 2, 1).eval()
    img = torch.rand(3, 700, 300)
    out = tiled_predict(img, net, (64, 64), 0.25, batch_size=8, device="cpu",
                        tile_filter=lambda y, x, th, tw: x == 0)
    torch.testing.assert_close(out[:, :, :48], net(img[None])[0, :, :, :48], atol=1e-5, rtol=0)
    assert float(out[:, :, 64:].abs().max()) == 0.0  # columns no kept tile covers stay 0


@pytest.mark.parametrize("kw", [dict(), dict(border_pad=7), dict(out_scale=2), dict(batch_size=1),
                                dict(tile_filter=lambda y, x, th, tw: (x // 48 + y // 48) % 3 != 0)])
def test_vertical_stripes_give_the_one_pass_output(kw, tmp_path):
    """``stripe_width`` bounds memory for wide images without changing a value (the growth benchmark's flat
    memory); a conv model (3x3) so every blended pixel depends on its neighbours' tiles."""
    from histoseg.inference import tiled_predict
    from histoseg.inference.tiled import stripe_plan

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1).eval()
    s = kw.get("out_scale", 1)
    net = conv if s == 1 else (lambda x: torch.nn.functional.interpolate(conv(x), scale_factor=s))
    img = torch.rand(3, 150, 530)
    args = dict(tile_shape=(64, 64), overlap=0.3, device="cpu", **{"batch_size": 3, **kw})
    one = tiled_predict(img, net, stripe_width=None, **args)
    striped = tiled_predict(img, net, stripe_width=128, **args)
    torch.testing.assert_close(striped, one, atol=1e-6, rtol=0)
    out = np.lib.format.open_memmap(tmp_path / "o.npy", mode="w+", dtype=np.float32, shape=tuple(one.shape))
    assert tiled_predict(img, net, stripe_width=100, out=out, **args) is out
    np.testing.assert_allclose(out, one.numpy(), atol=1e-6)
    plan = stripe_plan([0, 44, 88, 132, 176], 240, 64, 100)
    assert [(a, b) for _, a, b in plan] == [(0, 100), (100, 200), (200, 240)]
    assert plan[1][0] == [44, 88, 132, 176]  # every tile overlapping columns 100..199
    with pytest.raises(ValueError, match="at least the tile width"):
        stripe_plan([0, 44, 88], 200, 64, 32)


def test_wsi_benchmark_measures_the_slide_against_in_memory_and_memory_per_size(quick_wsi):
    m = quick_wsi["ratio"]["models"]["pointwise"]
    assert quick_wsi["ratio"]["tissue_source"] == "synthetic generator"
    assert 0 < m["tiles"] < m["grid_tiles"]  # the blank margins are skipped
    assert m["ratio"] == pytest.approx(m["in_memory_s"] / m["slide_infer_s"], rel=0.05)
    assert m["slide_mpix_per_s"] == pytest.approx(m["tissue_mpix"] / m["slide_infer_s"], rel=0.05)
    rows = quick_wsi["memory"]
    assert [r["side"] for r in rows] == [768, 1280] and all(r["status"] == "ok" for r in rows), rows
    for r in rows:  # measured in a fresh process per size, with its tile-reading worker
        assert r["peak_rss_mb"] >= r["rss_before_mb"] > 0 and r["workers_peak_rss_mb"] > 0
        assert r["total_peak_rss_mb"] > r["workers_peak_rss_mb"] and r["nuclei"] > 0
    with pytest.raises(ValueError, match="unknown wsi benchmark setting"):
        wsi_bench.settings(Options(quick=True, extra={"side": 3}))


def test_wsi_goals_and_table(quick_wsi):
    entries = {"wsi": {"result": quick_wsi, "command": "python -m benchmarks.run --only wsi", "git": "abc"}}
    goals = run.goals(entries, "cpu")
    g = goals["wsi_slide_ge_0.8_in_memory"]
    assert g["value"] == quick_wsi["ratio"]["models"]["pointwise"]["ratio"] and g["hit"] == (g["value"] >= 0.8)
    mem = goals["wsi_memory_flat"]
    assert mem["sides"] == [768, 1280] and mem["largest_vs_smallest"] == pytest.approx(
        mem["peak_rss_mb"][1] / mem["peak_rss_mb"][0], rel=1e-2)
    text = table.render({"cpu-test": {"env": {"device": "cpu"}, "benchmarks": entries, "goals": goals}})
    assert "Whole-slide inference" in text and "`python -m benchmarks.run --only wsi`" in text and "| 1280 |" in text


def test_tuning_benchmark_times_identical_tables_and_renders():
    from benchmarks import tuning

    res = tuning.run(Options(quick=True))
    assert [r["mode"] for r in res["rows"]] == ["watershed", "markers"]
    for r in res["rows"]:
        assert r["tables_equal"] is True  # the tuner's shortcuts give the plain loop's scores
        assert r["settings"] == (144 if r["mode"] == "watershed" else 120)
        assert r["plain_s"] > 0 and r["tuner_1_s"] > 0 and r["tuner_auto_s"] > 0
    entries = {"tuning": {"result": res, "command": "python -m benchmarks.run --only tuning", "git": "abc"}}
    text = table.render({"cpu-test": {"env": {"device": "cpu"}, "benchmarks": entries, "goals": {}}})
    assert "Post-processing tuning" in text and "| watershed | 144 |" in text
