"""Tiled inference: megapixels/s of ``histoseg.inference.tiled_predict`` vs MONAI ``sliding_window_inference``.

Same model (eval mode), same image (a MoNuSeg test image, float CHW on the host, as a DataLoader gives it),
same settings: Gaussian blending (sigma = tile/8), the same overlap, tile batch, constant padding; both return
the whole ``(K, H, W)`` float32 output on the host. MONAI runs its windows and stitching on the device
(``sw_device = device = <device>``, its fastest mode) and the result is moved to the host inside the timing.
With ``autocast`` both get the same bf16-autocast predictor (``net(x).float()``). The two alternate
``repeats`` times and the best time of each is kept; ``max_abs_diff`` compares their outputs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Options, clock, module_main, progress, rate, ratio

FULL = dict(model="unet_r34", image="monuseg/test/images", tile=256, overlap=0.25,
            batch_size={"cpu": 8, "cuda": 32}, precisions=["fp32", "bf16"], repeats=3, image_shape=None)
QUICK = dict(model="tiny", image=None, tile=64, overlap=0.25, batch_size={"cpu": 4, "cuda": 4},
             precisions=["fp32", "bf16"], repeats=1, image_shape=[150, 230])


def settings(opts: Options) -> dict:
    s = dict(QUICK if opts.quick else FULL)
    s.update({k: v for k, v in opts.extra.items() if k in s})
    if isinstance(s["batch_size"], dict):
        s["batch_size"] = s["batch_size"]["cuda" if opts.torch_device.type == "cuda" else "cpu"]
    return s


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    if name == "unet_r34":
        from histoseg.models.backbones.smp import SMPModel

        return SMPModel(in_channels=3, num_classes=2, arch="Unet", encoder_name="resnet34", encoder_weights=None)
    raise ValueError(f"unknown benchmark model {name!r}; choose tiny or unet_r34")


def load_image(s: dict) -> tuple[torch.Tensor, str]:
    """``(3, H, W)`` float in [0, 1]: the first image of the data-kit folder, or seeded noise (quick)."""
    if s["image"]:
        from histoseg.data.datasets import to_tensor_image
        from histoseg.data.io import read_image
        from histoseg.utils.config import data_root

        folder = Path(data_root()) / s["image"]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
        if not files:
            raise FileNotFoundError(f"{folder}: no images for the inference benchmark")
        return to_tensor_image(read_image(files[0])), str(files[0])
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, *s["image_shape"], generator=g), "noise"


def predictor(net: torch.nn.Module, device: torch.device, precision: str):
    if precision == "fp32":
        return net

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return net(x).float()

    return run


def run(opts: Options) -> dict:
    from monai.inferers import sliding_window_inference

    from histoseg.inference import tiled_predict

    s = settings(opts)
    device = opts.torch_device
    net = build_model(s["model"]).to(device).eval()
    img, source = load_image(s)
    h, w = img.shape[-2:]
    mp = h * w / 1e6
    tile, ov, bs = (s["tile"], s["tile"]), s["overlap"], s["batch_size"]

    def ours(pred):
        return tiled_predict(img, pred, tile, ov, blend="gaussian", batch_size=bs, device=device, pad_mode="constant")

    def monai(pred):
        out = sliding_window_inference(img[None], tile, bs, pred, overlap=ov, mode="gaussian", sigma_scale=0.125,
                                       padding_mode="constant", sw_device=device, device=device)
        return out[0].cpu()

    rows = []
    with torch.inference_mode():
        for prec in s["precisions"]:
            pred = predictor(net, device, prec)
            small = torch.rand(3, tile[0] + 8, tile[1] + 8)
            tiled_predict(small, pred, tile, ov, batch_size=bs, device=device)  # warm-up: kernels, allocator
            sliding_window_inference(small[None], tile, bs, pred, overlap=ov, mode="gaussian", sw_device=device,
                                     device=device)
            best = {"histoseg": float("inf"), "monai": float("inf")}
            outs = {}
            for r in range(s["repeats"]):
                for name, fn in (("histoseg", ours), ("monai", monai)):
                    progress(f"tiled: {prec} {name} repeat {r + 1}/{s['repeats']}")
                    t0 = clock(device)
                    outs[name] = fn(pred)
                    best[name] = min(best[name], clock(device) - t0)
            diff = float((outs["histoseg"] - outs["monai"]).abs().max())
            rows.append({
                "precision": prec, "histoseg_mp_s": rate(mp, best["histoseg"]), "monai_mp_s": rate(mp, best["monai"]),
                "histoseg_vs_monai": ratio(best["monai"], best["histoseg"]),
                "histoseg_s": round(best["histoseg"], 6), "monai_s": round(best["monai"], 6),
                "max_abs_diff": diff, "output_abs_max": float(outs["monai"].abs().max()),
                "outputs_finite": bool(np.isfinite(outs["histoseg"].numpy()).all()),
            })
    return {
        "settings": {**s, "device": str(device), "image_source": source, "image_hw": [int(h), int(w)]},
        "rows": rows,
        "notes": "MP/s = input megapixels per second of one whole-image prediction (best of the repeats); "
                 "histoseg_vs_monai = MONAI time / histoseg time (>= 1: histoseg at least as fast); max_abs_diff = "
                 "largest difference between the two outputs (logits)",
    }


if __name__ == "__main__":
    module_main(run)
