#!/usr/bin/env python
"""The project brief's CPU reference, rebuilt: a plain single-file smp UNet-ResNet34 trained from scratch for a
fixed wall-clock budget, whole-image prediction, distance watershed.

The brief gives only its outline ("a plain single-file smp UNet-r34 script, trained from scratch for 25 min on
these 2 CPU cores (bf16 autocast), reaches whole-image MoNuSeg test Dice 0.797 / AJI 0.610 (watershed)"), so this
is our reconstruction of such a script, with the choices a plain script makes, fixed before any test score was seen:

* all 30 official training images (no validation split, no model selection: the last weights are used);
* random 256 px crops with flips and 90-degree rotations, batch 8, built in the main process;
* ``smp.Unet("resnet34", encoder_weights=None, classes=1)``, BCE-with-logits + soft Dice, Adam at a constant 1e-3;
* bf16 autocast where the CPU has bf16 kernels (as ``precision=auto`` in histoseg decides), else fp32;
* training stops at the first step that ends past ``--minutes`` (wall clock, from the first step);
* test: each whole image in one pass (reflect-padded to a multiple of 32), threshold 0.5, holes filled, objects
  under 30 px dropped, then a distance-transform watershed with one marker per regional maximum of the distance
  map that stands at least 2 px above its surroundings (h-maxima, h = 2).

Only the reading of the images and the scoring are histoseg's (the MoNuSeg reader, so the ground truth is the one
the recipes are scored on; ``histoseg.metrics``, so the numbers are computed alike). Usage::

    OMP_NUM_THREADS=1 python experiments/equal_budget/plain_unet.py --minutes 25 --seed 0 --out logs/eb/plain/seed_0

writes ``summary.json`` (``mean`` of each metric over the test images, and the settings) and ``per_image.csv`` into
``--out``, as a histoseg run does, so ``experiments/collect.py`` reads them.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder (summary.json, per_image.csv)")
    p.add_argument("--data-dir", type=Path, default=None, help="the data kit root (default: as histoseg's paths.data_dir)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps even within the budget (for tests)")
    p.add_argument("--max-test-images", type=int, default=None, help="score only the first N test images (for tests)")
    return p.parse_args(argv)


def load(reader, ids):
    out = []
    for cid in ids:
        s = reader.read(cid)
        out.append((cid, s.image, s.mask.astype(np.float32), s.instances))
    return out


def random_batch(train, rng: np.random.Generator, batch: int, patch: int):
    xs, ys = [], []
    for _ in range(batch):
        _, img, mask, _ = train[rng.integers(len(train))]
        h, w = mask.shape
        r, c = rng.integers(0, h - patch + 1), rng.integers(0, w - patch + 1)
        x, y = img[r:r + patch, c:c + patch], mask[r:r + patch, c:c + patch]
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - 0.5) / 0.25
    return x, torch.from_numpy(np.stack(ys))[:, None]


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.float())
    inter = (p * target).sum()
    return 1.0 - (2 * inter + 1.0) / (p.sum() + target.sum() + 1.0)


@torch.no_grad()
def predict(model, image: np.ndarray, amp: bool) -> np.ndarray:
    h, w = image.shape[:2]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)
    x = (x - 0.5) / 0.25
    ph, pw = (-h) % 32, (-w) % 32
    x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    return torch.sigmoid(logits.float())[0, 0, :h, :w].numpy()


def watershed_instances(prob: np.ndarray, min_size: int = 30, h: float = 2.0) -> np.ndarray:
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    fg = ndi.binary_fill_holes(prob > 0.5)
    comps, n = ndi.label(fg)
    fg &= (np.bincount(comps.ravel(), minlength=n + 1) >= min_size)[comps] & (comps > 0)
    if not fg.any():
        return np.zeros(prob.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    # one marker per connected regional maximum: the flat ridge of an elongated nucleus is one maximum, not many
    markers, _ = ndi.label(h_maxima(dist, h).astype(bool) & fg)
    inst = watershed(-dist, markers, mask=fg)
    # a component without a marker (flat or tiny) keeps its own id
    missing = fg & (inst == 0)
    if missing.any():
        extra, n = ndi.label(missing)
        inst[missing] = extra[missing] + inst.max()
    return inst.astype(np.int32)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import segmentation_models_pytorch as smp

    from histoseg.data.readers.monuseg import MoNuSegReader
    from histoseg.metrics.instance import instance_scores
    from histoseg.metrics.pixel import image_scores
    from histoseg.utils.config import data_root
    from histoseg.utils.precision import resolve_precision

    data_dir = args.data_dir or Path(data_root())
    reader = MoNuSegReader(data_dir / "monuseg")
    split = reader.official_split()
    train = load(reader, split["train"])
    test_ids = split["test"][: args.max_test_images] if args.max_test_images else split["test"]

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    precision = resolve_precision("auto", "cpu")
    amp = precision.startswith("bf16")
    model = smp.Unet("resnet34", encoder_weights=None, classes=1)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    bce = torch.nn.BCEWithLogitsLoss()

    model.train()
    t0, step, budget_s = time.perf_counter(), 0, args.minutes * 60.0
    log_every = 20
    while True:
        x, y = random_batch(train, rng, args.batch_size, args.patch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = bce(logits.float(), y) + dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        if step % log_every == 0:
            print(f"step {step}  loss {loss.item():.4f}  {elapsed / 60:.1f} min", flush=True)
        if elapsed >= budget_s or (args.max_steps and step >= args.max_steps):
            break
    fit_s = time.perf_counter() - t0

    model.eval()
    rows = []
    t1 = time.perf_counter()
    for cid in test_ids:
        s = reader.read(cid)
        prob = predict(model, s.image, amp)
        inst = watershed_instances(prob)
        row = {"case_id": cid, **image_scores((inst > 0).astype(np.uint8), s.mask, 2)}
        row.update(instance_scores(s.instances, inst))
        rows.append(row)
        print(f"{cid}: dice {row['dice']:.3f} aji {row['aji']:.3f} pq {row['pq']:.3f}", flush=True)
    keys = ["dice", "iou", "acc", "aji", "aji_plus", "pq", "dq", "sq", "obj_f1", "n_true", "n_pred"]
    summary = {
        "script": "experiments/equal_budget/plain_unet.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "seed": args.seed,
        "minutes": args.minutes,
        "fit_s": round(fit_s, 1),
        "steps": step,
        "images_seen": step * args.batch_size,
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "train_images": len(train),
        "test_images": len(rows),
        "test_s": round(time.perf_counter() - t1, 1),
        "n_images": len(rows),
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},  # the key experiments/collect.py reads
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "per_image.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", *keys])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ["case_id", *keys]})
    tmp.replace(args.out / "per_image.csv")
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(args.out / "summary.json")
    print(json.dumps(summary["mean"]), flush=True)
    return summary


if __name__ == "__main__":
    main()
