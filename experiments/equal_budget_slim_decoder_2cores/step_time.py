"""Training-step time of the 25-minute recipe's network for several UNet decoder widths, side by side.

The network of ``experiment=monuseg_instance model.net.encoder_name=resnet18``: smp ``Unet`` with a ResNet-18
encoder (random init), 4 output channels (the three-class head and the distance head share one decoder),
channels_last, fp32 (bf16 where ``--bf16``), AdamW, batch 4 of 256 px: one forward, backward and optimizer step on a
fixed random batch (model only: no data loading, no validation). The configurations run in turns (A B C A B C ...)
so that a change in the machine's load hits each of them alike; the median step of each is reported.

    python experiments/equal_budget_slim_decoder_2cores/step_time.py --out experiments/equal_budget_slim_decoder_2cores/step_time.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's benchmarks package
    sys.path.insert(0, str(ROOT))
from benchmarks.common import cpu_model  # noqa: E402

DEFAULT = [[256, 128, 64, 32, 16], [128, 64, 32, 16, 16], [128, 64, 32, 16, 8]]


def build(decoder: list[int], seed: int = 0):
    torch.manual_seed(seed)
    net = smp.Unet("resnet18", encoder_weights=None, classes=4, decoder_channels=decoder)
    net = net.to(memory_format=torch.channels_last)
    return net, torch.optim.AdamW(net.parameters(), 2e-3)


def step(net, opt, x, bf16: bool) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = net(x)
    loss = y.float().square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decoders", nargs="+", default=[",".join(map(str, d)) for d in DEFAULT],
                    help="decoder widths, comma-separated, one configuration per argument")
    ap.add_argument("--rounds", type=int, default=8, help="measured steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    decoders = [[int(c) for c in d.split(",")] for d in a.decoders]
    nets = [build(d) for d in decoders]
    x = torch.randn(4, 3, 256, 256, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    for net, opt in nets:  # warm-up
        for _ in range(2):
            step(net, opt, x, a.bf16)
    times = [[] for _ in nets]
    for _ in range(a.rounds):
        for i, (net, opt) in enumerate(nets):
            times[i].append(step(net, opt, x, a.bf16))
    base = statistics.median(times[0])
    rows = []
    for d, (net, _), t in zip(decoders, nets, times):
        med = statistics.median(t)
        rows.append({"decoder_channels": d, "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
                     "median_step_s": round(med, 4), "steps_s": [round(v, 4) for v in t],
                     "speedup_vs_first": round(base / med, 3)})
        print(f"decoder {d}: {rows[-1]['params_m']} M parameters, median step {med:.3f} s, x{base / med:.2f}", flush=True)
    out = {"rows": rows, "batch": 4, "patch": 256, "encoder": "resnet18", "out_channels": 4, "channels_last": True,
           "precision": "bf16 autocast" if a.bf16 else "fp32", "threads": a.threads, "rounds": a.rounds,
           "torch": torch.__version__, "smp": smp.__version__, "cpu": cpu_model(),
           "command": "python experiments/equal_budget_slim_decoder_2cores/step_time.py " + " ".join(argv or [])}
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
