"""Shared pieces of the benchmarks: options, device choice, timing, environment record, config composition."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from histoseg.utils.precision import cpu_has_fast_bf16

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Options:
    """What every benchmark receives.

    ``quick``: tiny sizes (seconds, for tests); ``device``: ``cpu``, ``cuda`` or ``auto`` (CUDA when available);
    ``cache_dir``: where patch stores are built (reused between runs); ``work_dir``: scratch files (memmaps).
    """

    quick: bool = False
    device: str = "auto"
    cache_dir: str = str(ROOT / ".cache" / "bench")
    work_dir: str = "/tmp/histoseg-bench"
    threads: int = 0  # torch intra-op threads (0: torch default)
    extra: dict = field(default_factory=dict)

    @property
    def torch_device(self) -> torch.device:
        return select_device(self.device)


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error naming the choices."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Wall time after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_count() -> int:
    from histoseg.utils.machine import available_cores

    return available_cores()


def result_name(device: torch.device) -> str:
    """File stem of the results: ``cuda-<gpu>`` or ``cpu-<model>-<n>cpu``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"cuda-{slug}" if device.type == "cuda" else f"cpu-{slug}-{cpu_count()}cpu"


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    import albumentations
    import h5py
    import lightning
    import numpy
    import segmentation_models_pytorch as smp

    out = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
           "segmentation_models_pytorch": smp.__version__, "albumentations": albumentations.__version__,
           "h5py": h5py.__version__, "numpy": numpy.__version__}
    try:
        import monai

        out["monai"] = monai.__version__
    except ImportError:
        out["monai"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were measured."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        # what makes CPU bf16 fast or slow (histoseg/utils/precision.py): AVX2 vs AVX512, oneDNN bf16 kernels
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": cpu_has_fast_bf16(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": loadavg(),
        "versions": versions(),
        "git": git_sha(),
    }


def rate(count: float, seconds: float) -> float:
    """``count / seconds`` to 5 significant digits."""
    return float(f"{count / seconds:.5g}") if seconds > 0 else float("nan")


def ratio(a: float, b: float) -> float:
    """``a / b`` to 4 significant digits."""
    return float(f"{a / b:.4g}") if b else float("nan")


def compose(overrides: list[str], out_dir: str | Path):
    """``conf/train.yaml`` composed with ``overrides`` (Hydra compose API), outputs under ``out_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import histoseg  # noqa: F401  (resolvers)
    from histoseg.utils.config import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    out = Path(out_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
        del cfg.hydra
    return cfg


def write_json(path: str | Path, data: dict) -> None:
    from histoseg.data.io import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def module_main(run_fn, argv: list[str] | None = None) -> None:
    """``python -m benchmarks.<name> --json OUT [--quick] [--device D] [--threads N] [--cache-dir C] [--work-dir W]``: one
    benchmark and write its result (what ``benchmarks.run`` calls in a subprocess)."""
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=Options.cache_dir)
    p.add_argument("--work-dir", default=Options.work_dir)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--extra", default="{}", help="JSON object of benchmark-specific settings")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    opts = Options(quick=a.quick, device=a.device, cache_dir=a.cache_dir, work_dir=a.work_dir, threads=a.threads,
                   extra=json.loads(a.extra))
    result = run_fn(opts)
    write_json(a.json, result)


def options_dict(opts: Options) -> dict:
    return asdict(opts)


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
