"""Rewrite the results tables of ``benchmarks/README.md`` from ``benchmarks/results/*.json``.

    python -m benchmarks.table            # rewrites the text between the bench markers
    python -m benchmarks.table --check    # exit 1 if the README is not up to date

``-quick.json`` files (tiny test sizes) are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS, ROOT

README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 0.01 and v != 0 else f"{v:,.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def _hit(g: dict | None) -> str:
    if not g or g.get("hit") is None:
        return "not measured"
    return "**hit**" if g["hit"] else "**miss**"


def section(name: str, data: dict) -> list[str]:
    env, b = data.get("env", {}), data.get("benchmarks", {})
    lines = [f"### {env.get('device_name', name)} (`results/{name}.json`)", ""]
    isa = ""
    if "cpu_capability" in env:  # recorded since 2026-12: decides whether CPU bf16 is fast (histoseg/utils/precision.py)
        isa = f" ({env['cpu_capability']}, {'with' if env.get('cpu_bf16_kernels') else 'no'} oneDNN bf16 kernels)"
    lines.append(f"`{data.get('command', '?')}` on {env.get('date', '?')}, {env.get('cpu_count', '?')} CPUs{isa}, "
                 f"torch {env.get('versions', {}).get('torch', '?')}, threads: {data.get('threads', '?')}, "
                 f"git {env.get('git', '?')}.")
    lines.append("")
    goals = data.get("goals", {})
    g = goals.get("pipeline_ge_0.9_ceiling_bf16")
    li = goals.get("loader_ge_2x_step")
    inf = goals.get("inference_at_least_monai")
    ws_g, wm = goals.get("wsi_slide_ge_0.8_in_memory"), goals.get("wsi_memory_flat")
    lines.append("Goals: pipeline >= 0.9 x ceiling (bf16, GPU goal): "
                 f"{_f(g and g['value'])} ({_hit(g) if env.get('device', '').startswith('cuda') else 'CPU: reported only'}); "
                 f"loader >= 2 x step: {_f(li and li['value'])} ({_hit(li)}); "
                 f"inference >= MONAI: {_f(inf and inf['value'])} ({_hit(inf)})"
                 + (f"; slide >= 0.8 x in-memory: {_f(ws_g['value'])} ({_hit(ws_g)})" if ws_g else "")
                 + (f"; slide memory flat (largest / smallest peak RSS <= 1.25): {_f(wm['largest_vs_smallest'])} "
                    f"({_hit(wm)})" if wm else "") + ".")
    lines.append("")

    tr = (b.get("training") or {}).get("result")
    if tr:
        st = tr["settings"]
        e = b["training"]
        # a later `--only training` run replaces this entry but not the file's header command: name its own
        own = (f"; `{e['command']}` on {e.get('date', '?')}, git {e.get('git', '?')}"
               if e.get("command") and e["command"] != data.get("command") else "")
        lines.append(f"**Training** ({st['model']}, {st['patch_size']} px, batch {st['batch_size']}, {st['workers']} "
                     f"worker(s), {st['dataset']}; load {e.get('loadavg_before')}{own}):")
        lines.append("")
        rows = []
        for v in tr["variants"]:
            if v.get("status") != "ok":
                rows.append([v["variant"], v.get("status", "?"), "-", "-", "-", "-", "-"])
                continue
            rows.append([v["variant"], v["pipeline_img_s"], v["ceiling_img_s"], v["pipeline_vs_ceiling"],
                         v.get("pipeline_vs_ceiling_mean"), v["loader_vs_step"], v["first_step_s"]["ceiling"]])
        lines += _table(["variant", "pipeline img/s", "ceiling img/s", "pipeline / ceiling", "(block means)",
                         "loader / step", "first step s"], rows)
    inf_r = (b.get("inference") or {}).get("result")
    if inf_r:
        st = inf_r["settings"]
        lines.append(f"**Tiled inference** ({st['model']}, {st['image_hw'][0]}x{st['image_hw'][1]} image, tile "
                     f"{st['tile']}, overlap {st['overlap']}, batch {st['batch_size']}, Gaussian):")
        lines.append("")
        lines += _table(["precision", "histoseg MP/s", "MONAI MP/s", "MONAI time / histoseg time", "max abs diff"],
                        [[r["precision"], r["histoseg_mp_s"], r["monai_mp_s"], r["histoseg_vs_monai"], r["max_abs_diff"]]
                         for r in inf_r["rows"]])
    gr = (b.get("growth") or {}).get("result")
    if gr:
        lines.append(f"**Cost growth** ({gr['settings']['model']}; uint8 memmap in, float32 memmap out):")
        lines.append("")
        rows = []
        for r in gr["rows"]:
            if r.get("status") != "ok":
                rows.append([f"{r['size']}", r.get("status"), "-", "-", "-", "-"])
                continue
            rows.append([f"{r['size']}", r["seconds"], r["s_per_mp"], r["time_vs_smallest_per_pixel"],
                         r["peak_heap_growth_mib"], r["vm_hwm_mib"]])
        lines += _table(["side px", "seconds", "s / MP", "s/MP vs smallest", "peak heap MiB", "VmHWM MiB"], rows)
    ws = (b.get("wsi") or {}).get("result")
    if ws:
        e, st, ra = b["wsi"], ws["settings"], ws["ratio"]
        lines.append(f"**Whole-slide inference** (`{e.get('command', '?')}` on {e.get('date', '?')}, git "
                     f"{e.get('git', '?')}; {ra['side']} px mosaic of {ra['tissue_source']}, tile {st['tile']}, "
                     f"overlap {st['overlap']}, batch {st['batch']}, {st['threads']} thread(s), {st['workers']} "
                     f"tile-reading worker(s); load {e.get('loadavg_before')}):")
        lines.append("")
        lines += _table(["model", "tissue MPix", "slide MPix/s", "in-memory MPix/s", "slide / in-memory",
                         "slide total s (with post-processing)"],
                        [[k, m["tissue_mpix"], m["slide_mpix_per_s"], m["in_memory_mpix_per_s"], m["ratio"],
                          m["slide_total_s"]] for k, m in ra["models"].items()])
        rows = []
        for r in ws["memory"]:
            if r.get("status") != "ok":
                rows.append([str(r["side"]), r.get("status", "?"), "-", "-", "-"])
                continue
            rows.append([str(r["side"]), r["peak_rss_mb"], r["workers_peak_rss_mb"], r["wall_s"], r["nuclei"]])
        lines += _table(["slide side px", "peak RSS MB", "worker peak RSS MB", "histoseg-predict s", "nuclei"], rows)
    tu = (b.get("tuning") or {}).get("result")
    if tu:
        st, e = tu["settings"], b["tuning"]
        lines.append(f"**Post-processing tuning** (`{e.get('command', '?')}`, git {e.get('git', '?')}; default grid, "
                     f"aji_pq objective, {st['n_images']} MoNuSeg crops of {st['crop']} px with simulated maps, "
                     f"{st['cores']} cores; seconds):")
        lines.append("")
        lines += _table(["mode", "settings", "plain loop", "tuner, 1 process", "tuner, auto processes",
                         "speedup (1 / auto)", "identical tables"],
                        [[r["mode"], str(r["settings"]), r["plain_s"], r["tuner_1_s"], r["tuner_auto_s"],
                          f"{_f(r['speedup_1'])} / {_f(r['speedup_auto'])}", _f(r["tables_equal"])]
                         for r in tu["rows"]])
    dp = (b.get("data") or {}).get("result")
    if dp:
        st = dp["settings"]
        lines.append(f"**Data pipeline** (patches/s, {st['dataset']}, {st['patch_size']} px, batch {st['batch_size']}; "
                     f"ratios vs folder in brackets; load {b['data'].get('loadavg_before')}):")
        lines.append("")
        rows = [[p["aug"], str(p["workers"]), p["folder"], f"{_f(p['store'])} ({_f(p['store_vs_folder'])})",
                 f"{_f(p['store_patches'])} ({_f(p['store_patches_vs_folder'])})"] for p in dp["pairs"]]
        lines += _table(["aug", "workers", "folder", "store, whole images", "store, patches"], rows)
        if dp.get("gpu_aug_pairs"):
            rows = [[g["gpu_aug"], str(g["workers"]), g["gpu_aug_patches_per_s"], g["cpu_aug_patches_per_s"],
                     g["gpu_vs_cpu"]] for g in dp["gpu_aug_pairs"]]
            lines += _table(["gpu_aug (aug=none)", "workers", "patches/s", "same flips on CPU", "ratio"], rows)
    return lines


def render(results: dict[str, dict]) -> str:
    if not results:
        return "_No results yet: run `make bench`._"
    lines = []
    for name in sorted(results):
        lines += section(name, results[name])
    return "\n".join(lines).rstrip() + "\n"


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if not p.stem.endswith("-quick")}


def rewrite(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"{README}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.table")
    p.add_argument("--check", action="store_true", help="exit 1 if the README tables are stale")
    a = p.parse_args(argv)
    text = README.read_text()
    new = rewrite(text, render(load_results()))
    if a.check:
        return 0 if new == text else 1
    if new != text:
        from histoseg.data.io import atomic_write_text

        atomic_write_text(README, new)
    print(f"{README}: {'updated' if new != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
