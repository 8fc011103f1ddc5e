"""Training throughput: images/s of the full pipeline vs the model-only ceiling, in the same process.

* ``pipeline``: the real thing: ``HistoDataModule`` (real dataset, real aug, DataLoader workers), the real
  ``SegmentationTask`` (loss, metrics, logging, ``gpu_aug``) trained by a Lightning ``Trainer`` at the given
  precision; timed over ``steps`` optimizer steps after ``warm`` steps (data loading included).
* rates use the *median* step time (robust to the stalls of a shared machine); ``*_mean`` variants use the
  whole block; every step time is kept in ``step_s``.
* ``ceiling``: the same task object (same net, ``channels_last`` / ``torch.compile`` settings, loss and
  optimizer) on a random batch already on the device: forward, loss, backward, optimizer step under the
  same autocast. Measured before and after the pipeline; the mean is the ceiling.
* ``loader``: the DataModule's train loader alone (batches/s on the device), to compare with the steps/s
  the training step consumes (``loader_vs_step``; the CPU goal is >= 2).

Each variant runs in its own subprocess (a fresh process per precision / compile setting, and a time limit
for ``torch.compile``, whose first step can take minutes on a CPU; a variant over its limit is recorded as
``timeout``, not dropped).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ROOT, Options, clock, compose, module_main, progress, rate, ratio

VARIANTS = {
    "fp32": dict(precision="32-true"),
    "fp32_channels_last": dict(precision="32-true", channels_last=True),
    "fp32_channels_last_compile": dict(precision="32-true", channels_last=True, compile=True),
    "bf16": dict(precision="bf16-mixed"),
    "bf16_channels_last": dict(precision="bf16-mixed", channels_last=True),
    "bf16_compile": dict(precision="bf16-mixed", compile=True),
    "bf16_gpu_aug": dict(precision="bf16-mixed", aug="none", gpu_aug="stain"),
}
FULL = dict(dataset="monuseg", model="unet_r34", model_overrides=[], patch_size=256, aug="light",
            batch_size={"cpu": 4, "cuda": 32}, workers={"cpu": 1, "cuda": 8}, warm={"cpu": 2, "cuda": 10},
            steps={"cpu": 4, "cuda": 40}, loader_batches={"cpu": 6, "cuda": 40}, variants=list(VARIANTS),
            timeout_s=420, compile_timeout_s=540)
QUICK = dict(dataset="tcia_nuclei", model="unet", model_overrides=["model.net.width=8", "model.net.depth=3"],
             patch_size=64, aug="light", batch_size={"cpu": 2, "cuda": 2}, workers={"cpu": 0, "cuda": 0},
             warm={"cpu": 1, "cuda": 1}, steps={"cpu": 2, "cuda": 2}, loader_batches={"cpu": 2, "cuda": 2},
             variants=["fp32", "bf16_gpu_aug"], timeout_s=300, compile_timeout_s=300)


def settings(opts: Options) -> dict:
    s = dict(QUICK if opts.quick else FULL)
    s.update({k: v for k, v in opts.extra.items() if k in s})
    dev = opts.torch_device.type
    for k in ("batch_size", "workers", "warm", "steps", "loader_batches"):
        if isinstance(s[k], dict):
            s[k] = s[k]["cuda" if dev == "cuda" else "cpu"]
    return s


def _optimizer(task):
    opt = task.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


def ceiling(task, device: torch.device, precision: str, s: dict, warm: int) -> dict:
    """Model-only images/s: random batch on the device, forward + loss + backward + step, same autocast."""
    task.to(device).train()
    opt = _optimizer(task)
    b, ps = s["batch_size"], s["patch_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(b, 3, ps, ps, generator=g).to(device)
    y = torch.randint(0, 2, (b, ps, ps), generator=g).to(device)
    amp = precision.startswith("bf16")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = task.loss_fn(task(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = clock(device)
    first = None
    for i in range(warm):
        step()
        if i == 0:
            first = clock(device) - t
    times = [clock(device)]
    for _ in range(s["steps"]):
        step()
        times.append(clock(device))
    return {**step_rates(times, b), "first_step_s": round(first, 2) if first is not None else None}


def step_rates(times: list[float], batch: int) -> dict:
    """Images/s from step end times: over the median step (robust to a few stalled steps on a shared machine)
    and over the whole block; plus the step times."""
    dts = np.diff(np.asarray(times))
    return {"img_s": rate(batch, float(np.median(dts))), "img_s_mean": rate(batch * len(dts), times[-1] - times[0]),
            "step_s": [round(float(d), 4) for d in dts]}


def pipeline(task, dm, device: torch.device, precision: str, s: dict) -> dict:
    """Real DataModule + real SegmentationTask through a Lightning Trainer; images/s over the timed steps."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.t = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.t[batch_idx] = clock(device)  # an interval = fetching the batch + the whole training step

        def on_train_start(self, trainer, pl_module):
            self.t["start"] = clock(device)

    cb = StepClock()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=s["warm"] + s["steps"], max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
    )
    trainer.fit(task, datamodule=dm)
    times = [cb.t[i] for i in range(s["warm"] - 1, s["warm"] + s["steps"])]
    return {**step_rates(times, s["batch_size"]), "first_step_s": round(cb.t[0] - cb.t["start"], 2),
            "steps_done": int(trainer.global_step)}


def run_variant(opts: Options, name: str) -> dict:
    import lightning as L

    from benchmarks.data_pipeline import patches_per_second
    from histoseg.tasks.train import build_datamodule, build_task

    if name not in VARIANTS:
        raise ValueError(f"unknown training variant {name!r}; choose from {list(VARIANTS)}")
    s, v = settings(opts), VARIANTS[name]
    device = opts.torch_device
    torch.set_float32_matmul_precision("high")
    L.seed_everything(0, verbose=False)
    out = Path(opts.work_dir) / "training" / name
    b, w = s["batch_size"], s["workers"]
    overrides = [
        f"dataset={s['dataset']}", f"model={s['model']}", *s["model_overrides"], f"aug={v.get('aug', s['aug'])}",
        f"patch_size={s['patch_size']}", f"dataset.batch_size={b}", f"dataset.num_workers={w}",
        f"dataset.samples_per_epoch={b * (s['warm'] + s['steps'] + 2)}", f"trainer.precision={v['precision']}",
        f"model.channels_last={str(v.get('channels_last', False)).lower()}",
        f"model.compile={str(v.get('compile', False)).lower()}", "seed=0", "logger=csv",
    ]
    if v.get("gpu_aug"):
        overrides.append(f"gpu_aug={v['gpu_aug']}")
    cfg = compose(overrides, out)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    task = build_task(cfg, dm)
    task.setup("fit")  # channels_last / torch.compile exactly as the Trainer sets them up
    progress(f"train {name}: ceiling (before)")
    c1 = ceiling(task, device, v["precision"], s, max(s["warm"], 1))
    progress(f"train {name}: pipeline")
    p = pipeline(task, dm, device, v["precision"], s)
    progress(f"train {name}: ceiling (after)")
    c2 = ceiling(task, device, v["precision"], s, 1)
    progress(f"train {name}: loader alone")
    dm.train_set.length = b * (s["loader_batches"] + 2 * w + 6)
    loader_img_s = patches_per_second(dm.train_dataloader(), w, s["loader_batches"], device)
    ceil = round((c1["img_s"] + c2["img_s"]) / 2, 3)
    return {
        "variant": name, "status": "ok", "precision": v["precision"], "channels_last": bool(v.get("channels_last")),
        "compile": bool(v.get("compile")), "aug": v.get("aug", s["aug"]), "gpu_aug": v.get("gpu_aug"),
        "batch_size": b, "workers": w, "patch_size": s["patch_size"], "model": s["model"],
        "torch_threads": torch.get_num_threads(),
        "ceiling_img_s": ceil, "ceiling_img_s_before": c1["img_s"], "ceiling_img_s_after": c2["img_s"],
        "pipeline_img_s": p["img_s"], "pipeline_vs_ceiling": ratio(p["img_s"], ceil),
        "pipeline_vs_ceiling_mean": ratio(p["img_s_mean"], (c1["img_s_mean"] + c2["img_s_mean"]) / 2),
        "step_s": {"ceiling_before": c1["step_s"], "pipeline": p["step_s"], "ceiling_after": c2["step_s"]},
        "loader_batches_s": round(loader_img_s / b, 3), "step_batches_s": round(ceil / b, 3),
        "loader_vs_step": ratio(loader_img_s, ceil),
        "first_step_s": {"ceiling": c1["first_step_s"], "pipeline": p["first_step_s"]},
    }


def _subprocess_variant(opts: Options, name: str, limit: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "out.json"
        extra = json.dumps({**opts.extra, "variant": name})
        cmd = [sys.executable, "-m", "benchmarks.training", "--json", str(js), "--device", opts.device,
               "--cache-dir", opts.cache_dir, "--work-dir", opts.work_dir, "--threads", str(opts.threads),
               "--extra", extra]
        if opts.quick:
            cmd.append("--quick")
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"variant": name, "status": "timeout", "limit_s": limit,
                    "note": f"not measured: the variant did not finish within {limit} s on this machine"}
        if r.returncode != 0:
            return {"variant": name, "status": "error", "returncode": r.returncode, "stderr_tail": r.stderr[-2000:]}
        res = json.loads(js.read_text())
        res["wall_s"] = round(time.perf_counter() - t, 1)
        return res


def run(opts: Options) -> dict:
    if "variant" in opts.extra:  # one variant in this process (the subprocess side)
        return run_variant(opts, opts.extra["variant"])
    s = settings(opts)
    results = []
    for name in s["variants"]:
        limit = s["compile_timeout_s"] if VARIANTS[name].get("compile") else s["timeout_s"]
        progress(f"train: variant {name} (limit {limit} s)")
        if opts.extra.get("in_process"):
            results.append(run_variant(opts, name))
        else:
            results.append(_subprocess_variant(opts, name, limit))
    ok = [r for r in results if r.get("status") == "ok"]
    bf16 = next((r for r in ok if r["variant"] == "bf16"), None)
    best = max(ok, key=lambda r: r["pipeline_vs_ceiling"], default=None)
    return {
        "settings": {k: v for k, v in s.items() if k != "variants"} | {"device": str(opts.torch_device)},
        "variants": results,
        "goals": {
            "pipeline_vs_ceiling_bf16": bf16["pipeline_vs_ceiling"] if bf16 else None,
            "pipeline_vs_ceiling_best": {"variant": best["variant"], "value": best["pipeline_vs_ceiling"]} if best else None,
            "pipeline_vs_ceiling_goal": 0.9,
            "loader_vs_step_min": min((r["loader_vs_step"] for r in ok), default=None),
            "loader_vs_step_goal": 2.0,
        },
        "notes": "img/s = training images (patch_size crops) per second; ceiling = model-only (random batch on the "
                 "device, same task, loss, optimizer, autocast), mean of a block before and after the pipeline; "
                 "pipeline = Lightning Trainer over the real DataModule; loader_vs_step = loader images/s alone / "
                 "ceiling images/s (>= 2: the loader outpaces the step); first_step_s includes torch.compile",
    }


if __name__ == "__main__":
    module_main(run)
