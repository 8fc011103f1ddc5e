"""``init_from=<ckpt>``: a new run starts from another run's network weights (progressive resizing, transfer)."""
import pytest
import torch

from histoseg.data.io import DataError
from histoseg.models.loading import init_weights_from
from histoseg.tasks.utils import ConfigError
from tests.conftest import compose_cfg
from tests.helpers_ckpt import PointwiseNet, dark_is_nucleus, write_checkpoint


def _task(num_classes=2):
    from histoseg.models.modules.segmentation import SegmentationTask

    torch.manual_seed(123)
    return SegmentationTask(net=PointwiseNet(3, 1 if num_classes == 2 else num_classes), num_classes=num_classes)


def test_init_from_copies_the_network_weights(tmp_path):
    ckpt = write_checkpoint(tmp_path / "a.ckpt", 2, dark_is_nucleus, {"threshold": 0.5})
    task = _task()
    want = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(task.net.conv.weight, want["net.conv.weight"])
    assert init_weights_from(task, ckpt) == 2
    assert torch.equal(task.net.conv.weight, want["net.conv.weight"])
    assert torch.equal(task.net.conv.bias, want["net.conv.bias"])


def test_init_from_a_different_architecture_names_the_file_and_the_tensors(tmp_path):
    ckpt = write_checkpoint(tmp_path / "four.ckpt", 4, None, {"threshold": 0.5})
    task = _task(2)
    before = task.net.conv.weight.clone()
    with pytest.raises(DataError, match=r"four\.ckpt.*2 shape differs \(conv\.bias \(4,\) vs \(1,\)"):
        init_weights_from(task, ckpt)
    assert torch.equal(task.net.conv.weight, before)  # nothing half-loaded


def test_init_from_starts_a_fresh_run_from_the_weights(tmp_path):
    """Run B (another seed) starts from run A's weights: with a zero learning rate its parameters stay A's
    exactly, while its step counter starts again at 0 (a new run, not a resume: resuming A's two epochs with
    max_epochs=1 would end at A's step count)."""
    from histoseg.tasks.train import train

    common = ("test=false", "callbacks.validation_panels=null")
    _, a = train(compose_cfg(tmp_path / "a", *common, "seed=1", "trainer.max_epochs=2"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _, b = train(compose_cfg(tmp_path / "b", *common, "seed=2", "trainer.max_epochs=1", f"init_from={last}",
                             "optimizer.optimizer.lr=0.0"))
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    pa = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    pb = dict(b["model"].net.named_parameters())
    assert pb.keys() <= pa.keys() and all(torch.equal(pa[k], pb[k]) for k in pb)
    assert 0 < b["trainer"].global_step == a["trainer"].global_step // 2  # B's own single epoch
    _, c = train(compose_cfg(tmp_path / "c", *common, "seed=2", "trainer.max_epochs=1", "optimizer.optimizer.lr=0.0"))
    assert not all(torch.equal(pa[k], p) for k, p in c["model"].net.named_parameters())  # seed 2 alone differs


def test_init_from_and_ckpt_path_together_are_refused(tmp_path):
    from histoseg.tasks.train import train

    ckpt = write_checkpoint(tmp_path / "a.ckpt", 2, dark_is_nucleus, {"threshold": 0.5})
    with pytest.raises(ConfigError, match="init_from and ckpt_path"):
        train(compose_cfg(tmp_path / "run", f"init_from={ckpt}", f"ckpt_path={ckpt}"))
