"""DDP on CPU (gloo, 2 processes): ranks draw disjoint patches, together exactly the single-process ones,
and the synced validation metrics equal a single-process evaluation of the same weights."""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from histoseg.data.datasets import EpochSampler, ShardSampler
from tests.conftest import ROOT, TINY


class RecordPatches(L.Callback):
    """Writes one line per training sample (epoch, rank, hash of the image) to ``patches_rank<r>.txt``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        out = Path(trainer.default_root_dir) / f"patches_rank{trainer.global_rank}.txt"
        with open(out, "a") as f:
            for img in batch["image"]:
                f.write(f"{trainer.current_epoch} {trainer.global_rank} {image_hash(img)}\n")


def image_hash(img: torch.Tensor) -> str:
    return hashlib.sha1(img.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def test_epoch_sampler_gives_ranks_disjoint_blocks():
    keys = [list(EpochSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert [len(k) for k in keys] == [3, 3, 3]
    flat = [i for k in keys for _, i in k]
    assert sorted(flat) == list(range(9))  # disjoint, and together the first 9 of the one-process keys
    assert list(EpochSampler(10)) == [(0, i) for i in range(10)]  # no process group: one process
    with pytest.raises(ValueError, match="smaller than the number of processes"):
        EpochSampler(1, rank=0, world_size=2)


def test_shard_sampler_scores_every_image_once_with_equal_step_counts():
    shards = [list(ShardSampler(5, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    real = sorted(k for s in shards for k in s if isinstance(k, int))
    assert real == [0, 1, 2, 3, 4]
    assert [k for s in shards for k in s if not isinstance(k, int)] == [(0, True)]  # one filler
    assert list(ShardSampler(3)) == [0, 1, 2]  # one process: plain indices, no filler


DDP_ARGS = [
    "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
    "trainer.precision=32-true", "trainer.max_epochs=2", "dataset.reader.n_val=3", "dataset.samples_per_epoch=16",
    "dataset.reader.n_test=3", "+callbacks.patches._target_=tests.test_ddp.RecordPatches",
]
DATA_ARGS = DDP_ARGS[4:9]  # the same data and precision settings, for single-process comparisons


def test_ddp_two_cpu_processes(tmp_path, make_cfg):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "train.py", *TINY, *DDP_ARGS, f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    # seeds: each rank draws its own patches, together exactly those of the single-process keys
    per_rank = {}
    for rank in (0, 1):
        lines = (run_dir / f"patches_rank{rank}.txt").read_text().split("\n")
        per_rank[rank] = [tuple(x.split()) for x in lines if x]
    for rank, rows in per_rank.items():
        assert len(rows) == 2 * 16 // 2, f"rank {rank} drew {len(rows)} patches over 2 epochs"
    for epoch in ("0", "1"):
        h0 = {h for e, _, h in per_rank[0] if e == epoch}
        h1 = {h for e, _, h in per_rank[1] if e == epoch}
        assert len(h0) == len(h1) == 8 and not h0 & h1, f"epoch {epoch}: ranks drew overlapping patches"
        cfg = make_cfg(*DATA_ARGS)  # the same data settings, one process
        from histoseg.tasks.train import build_datamodule

        dm = build_datamodule(cfg)
        dm.setup("fit")
        single = {image_hash(dm.train_set[(int(epoch), i)]["image"]) for i in range(16)}
        assert h0 | h1 == single

    # metric sync: the DDP run's last val/dice equals one process validating the same weights
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/dice")]
    ddp_dice = float(rows[-1]["val/dice"])
    ddp_acc = float(rows[-1]["val/acc"])
    from histoseg.models.loading import load_task

    task = load_task(run_dir / "checkpoints" / "last.ckpt")
    dm = build_datamodule(make_cfg(*DATA_ARGS))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, precision="32-true")
    (single_metrics,) = trainer.validate(task, datamodule=dm, verbose=False)
    assert single_metrics["val/dice"] == pytest.approx(ddp_dice, abs=1e-6)
    assert single_metrics["val/acc"] == pytest.approx(ddp_acc, abs=1e-6)

    # the whole-image test report holds every test image exactly once (ranks gathered, fillers skipped)
    with open(run_dir / "per_image.csv") as f:
        ids = [row["case_id"] for row in csv.DictReader(f)]
    assert len(ids) == 3 and len(set(ids)) == 3


def test_ddp_with_lightning_distributed_sampler_is_rejected(make_cfg):
    from histoseg.tasks.train import train
    from histoseg.tasks.utils import ConfigError

    with pytest.raises(ConfigError, match="use_distributed_sampler"):
        train(make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.use_distributed_sampler=true"))
