"""Run the benchmarks and write ``benchmarks/results/<device>.json`` (``make bench``).

    python -m benchmarks.run                       # everything on the default device (CUDA if available)
    python -m benchmarks.run --only inference      # one benchmark (or a comma list); merged into the file
    python -m benchmarks.run --quick               # tiny sizes, seconds; writes <device>-quick.json
    python -m benchmarks.run --device cpu --threads 2

Benchmarks: ``data`` (patches/s, HDF5 store vs folder, per aug and workers), ``training`` (pipeline vs model-only
ceiling), ``inference`` (histoseg tiled vs MONAI sliding window), ``growth`` (time and memory, 2k..16k), ``wsi``
(whole-slide streaming vs in-memory tiled inference, peak memory for 4k..32k slides).
Each runs in its own subprocess with a time limit; its entry records the command, date, wall time and the
load average before and after (the machines are shared: compare figures within one entry, side by side).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    ROOT,
    Options,
    environment,
    loadavg,
    progress,
    select_device,
    write_json,
)

BENCHMARKS = {
    "data": "benchmarks.data_pipeline",
    "training": "benchmarks.training",
    "inference": "benchmarks.inference",
    "growth": "benchmarks.growth",
    "wsi": "benchmarks.wsi_bench",
    "tuning": "benchmarks.tuning",
}
LIMIT_S = {"data": 900, "training": 2400, "inference": 900, "growth": 1800, "wsi": 2400, "tuning": 1800}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds); results go to <device>-quick.json")
    p.add_argument("--only", default="", help=f"comma list of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads in each benchmark (0: torch default)")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/<device>.json)")
    p.add_argument("--cache-dir", default=Options.cache_dir, help="patch stores are built here once and reused")
    p.add_argument("--work-dir", default=Options.work_dir, help="scratch files (memmaps of up to ~3 GB)")
    p.add_argument("--extra", default=None,
                   help="JSON object of benchmark settings passed to each selected benchmark (e.g. with --only wsi: "
                        "'{\"sizes\": [4096, 8192]}'); recorded in the command")
    return p.parse_args(argv)


def selected(only: str) -> list[str]:
    names = [n.strip() for n in only.split(",") if n.strip()] or list(BENCHMARKS)
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        raise SystemExit(f"unknown benchmark(s) {bad}; choose from {', '.join(BENCHMARKS)}")
    return names


def run_one(name: str, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", BENCHMARKS[name], "--json", str(js), "--device", a.device,
               "--cache-dir", a.cache_dir, "--work-dir", a.work_dir, "--threads", str(a.threads)]
        if a.quick:
            cmd.append("--quick")
        if a.extra:
            cmd += ["--extra", a.extra]
        entry = {"loadavg_before": loadavg()}
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True, timeout=LIMIT_S[name])
            status = "ok" if r.returncode == 0 and js.is_file() else f"error (exit {r.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {LIMIT_S[name]} s"
        entry.update(status=status, wall_s=round(time.perf_counter() - t, 1), loadavg_after=loadavg())
        if status == "ok":
            entry["result"] = json.loads(js.read_text())
        return entry


def goals(entries: dict, device_type: str) -> dict:
    """Each goal of issue 8 with its measured value and hit / miss (``None``: not measured or not applicable)."""
    out = {}
    tr = (entries.get("training") or {}).get("result")
    if tr:
        g = tr["goals"]
        v = g["pipeline_vs_ceiling_bf16"]
        out["pipeline_ge_0.9_ceiling_bf16"] = {
            "value": v, "hit": (v >= 0.9) if v is not None else None,
            "applies": "GPU goal (UNet-r34, 256 px, bf16-mixed); on a CPU the ratio is reported only"
            if device_type != "cuda" else "GPU goal"}
        lv = g["loader_vs_step_min"]
        out["loader_ge_2x_step"] = {"value": lv, "hit": (lv >= 2) if lv is not None else None,
                                    "applies": "CPU goal: loader batches/s alone / training steps/s (model-only)"}
    inf = (entries.get("inference") or {}).get("result")
    if inf:
        worst = min(inf["rows"], key=lambda r: r["histoseg_vs_monai"])
        out["inference_at_least_monai"] = {
            "value": worst["histoseg_vs_monai"], "precision": worst["precision"], "hit": worst["histoseg_vs_monai"] >= 1,
            "max_abs_diff": max(r["max_abs_diff"] for r in inf["rows"]),
            "applies": "MONAI time / histoseg time, worst precision; outputs compared by max_abs_diff"}
    gr = (entries.get("growth") or {}).get("result")
    if gr:
        ok = [r for r in gr["rows"] if r.get("status") == "ok"]
        if ok:
            out["growth"] = {
                "sizes": [r["size"] for r in ok],
                "time_per_pixel_vs_smallest_max": max(r["time_vs_smallest_per_pixel"] for r in ok),
                "peak_heap_growth_mib": [r["peak_heap_growth_mib"] for r in ok],
                "applies": "time per pixel ~constant = linear time; heap growth ~constant = flat memory"}
    ws = (entries.get("wsi") or {}).get("result")
    if ws:
        ratios = {k: m["ratio"] for k, m in ws["ratio"]["models"].items()}
        v = ratios.get("unet", min(ratios.values()))
        out["wsi_slide_ge_0.8_in_memory"] = {
            "value": v, "per_model": ratios, "hit": v >= 0.8,
            "applies": "tissue MPix/s of streaming slide inference / in-memory tiled_predict, same model, tiles "
                       "and threads; the goal is judged on the UNet (a real model); the 1x1-conv model "
                       "(per_model.pointwise) is the I/O-bound extreme, reported only"}
        ok = [r for r in ws["memory"] if r.get("status") == "ok"]
        if ok:
            rss = [r["peak_rss_mb"] for r in ok]
            growth = round(rss[-1] / rss[0], 3)
            out["wsi_memory_flat"] = {
                "sides": [r["side"] for r in ok], "peak_rss_mb": rss,
                "workers_peak_rss_mb": [r["workers_peak_rss_mb"] for r in ok], "largest_vs_smallest": growth,
                "hit": growth <= 1.25 if len(ok) > 1 else None,
                "applies": "peak RSS of histoseg-predict per slide size; flat = largest <= 1.25 x smallest"}
    return out


def main(argv: list[str] | None = None) -> Path:
    a = parse(argv)
    names = selected(a.only)
    device = select_device(a.device)
    from benchmarks.common import result_name

    out = Path(a.out) if a.out else RESULTS / f"{result_name(device)}{'-quick' if a.quick else ''}.json"
    command = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    data = json.loads(out.read_text()) if out.is_file() else {"benchmarks": {}}
    env = environment(device)
    for name in names:
        progress(f"benchmark {name} ({BENCHMARKS[name]})")
        entry = run_one(name, a)
        entry.update(command=command, date=env["date"] if name == names[0] else environment(device)["date"],
                     git=env["git"], threads=a.threads or "torch default")
        data["benchmarks"][name] = entry
        progress(f"benchmark {name}: {entry['status']} in {entry['wall_s']} s")
        if not a.only or "command" not in data:  # `--only` adds entries (each with its command) to a full run's file
            data.update(env=env, command=command, threads=a.threads or "torch default")
        data["goals"] = goals(data["benchmarks"], device.type)
        write_json(out, data)  # after each benchmark: a later failure keeps the earlier results
    print(json.dumps(data["goals"], indent=1))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
