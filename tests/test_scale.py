"""Working resolution (``inference.scale``, histoseg.data.scale): training images and whole images at inference are
resized the same way, and predictions come back in the input's pixels."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histoseg.data.sample import Sample
from histoseg.data.scale import check_scale, rescale_sample, resize_chw, scaled_size


def blocky_sample(seed: int = 0) -> Sample:
    """An 80x120 image whose labels are constant on 2x2 blocks, so halving them loses nothing."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((40, 60), np.int32)
    inst[5:15, 5:15], inst[20:30, 30:45], inst[0:2, 58:60] = 3, 7, 9  # ids with gaps, one of 2x2 px after halving
    inst = inst.repeat(2, 0).repeat(2, 1)
    image = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    return Sample(image=image, mask=(inst > 0).astype(np.uint8), case_id="a", instances=inst, group="g",
                  source="a.png", meta={"k": 1})


def test_halving_keeps_labels_exact_and_averages_the_image():
    s = blocky_sample()
    h = rescale_sample(s, 0.5)
    assert h.image.shape == (40, 60, 3) and h.image.dtype == np.uint8
    np.testing.assert_array_equal(h.mask, s.mask[::2, ::2])
    # ids renumbered 1..N in their order (3 -> 1, 7 -> 2, 9 -> 3), shapes kept
    np.testing.assert_array_equal(h.instances, np.searchsorted([0, 3, 7, 9], s.instances[::2, ::2]))
    # an exact halving is the mean of each 2x2 block (area averaging), rounded
    blocks = s.image.reshape(40, 2, 60, 2, 3).astype(np.float64).mean((1, 3))
    assert np.abs(h.image.astype(np.float64) - blocks).max() <= 0.5 + 1e-6
    assert h.meta == {"k": 1, "scale": 0.5} and (h.case_id, h.group, h.source) == ("a", "g", "a.png")
    assert rescale_sample(s, 1.0) is s


def test_enlarging_and_odd_sizes():
    s = blocky_sample(1)
    u = rescale_sample(s, 1.5)
    assert u.image.shape[:2] == u.mask.shape == u.instances.shape == (120, 180)
    assert set(np.unique(u.mask)) <= {0, 1} and u.instances.max() == 3
    assert scaled_size(101, 7, 0.5) == (50, 4) and scaled_size(3, 3, 0.1) == (1, 1)
    x = torch.rand(2, 33, 47)
    assert resize_chw(x, (33, 47)) is x
    assert resize_chw(x, (16, 23)).shape == (2, 16, 23)


@pytest.mark.parametrize("bad", [0, -0.5, 5, "half", [0.5]])
def test_bad_scales_are_named(bad):
    with pytest.raises(ValueError, match="inference.scale"):
        check_scale(bad)
    assert check_scale(None) == 1.0 and check_scale("0.5") == 0.5


def test_task_predicts_at_the_working_resolution_and_answers_in_input_pixels():
    """With ``scale`` the network sees the resized whole image and the logits are resized back to the input's size:
    for a pointwise net that is ``resize(net(resize(x)))``, not ``net(x)``."""
    from histoseg.models.modules.segmentation import SegmentationTask
    from tests.helpers_ckpt import PointwiseNet

    seen = []

    class Recorder(PointwiseNet):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    torch.manual_seed(0)
    net = Recorder()
    task = SegmentationTask(net=net, inference={"tile_shape": [48, 64], "overlap": 0.0, "batch_size": 1,
                                                "scale": 0.5})
    x = torch.rand(3, 96, 128)
    got = task.predict_logits(x)
    assert got.shape == (1, 96, 128) and seen == [(48, 64)]  # one tile: the whole halved image
    small = x.reshape(3, 48, 2, 64, 2).mean((2, 4))[None]  # the 2x2 block means
    with torch.no_grad():
        want = F.interpolate(net.conv(small), size=(96, 128), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a uint8 image is the same image: scaled to [0, 1] before resizing
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(task.predict_logits(u8), task.predict_logits(u8.float() / 255), atol=1e-5, rtol=0)
    seen.clear()
    assert task.predict_logits(x, scale=1.0).shape == (1, 96, 128) and seen == [(48, 64), (48, 64), (48, 64),
                                                                                  (48, 64)]
    assert task.predict_maps(x)["probs"].shape == (1, 96, 128)


def test_training_images_are_resized_and_the_checkpoint_predicts_full_size(tmp_path):
    """``inference.scale=0.5`` halves the training images (patches count working pixels), leaves validation images
    as read, is stored in the checkpoint, and a restored model answers at the input's size; a patch store
    cannot be combined."""
    from histoseg.models.loading import load_task
    from histoseg.tasks.train import build_datamodule, train
    from tests.conftest import compose_cfg

    over = ["inference.scale=0.5", "patch_size=32", "inference.tile_shape=[32,32]"]
    dm = build_datamodule(compose_cfg(tmp_path, *over))
    dm.setup("fit")
    raw = [dm.reader.read(c) for c in dm.train_ids()]
    for s, r in zip(dm.train_set.source.samples, raw):
        assert s.image.shape == (48, 48, 3)
        np.testing.assert_array_equal(s.mask, rescale_sample(r, 0.5).mask)
    assert dm.val_set.samples[0].image.shape == (96, 96, 3)
    with pytest.raises(ValueError, match="inference.scale=0.5 resizes whole training images.*patch_store"):
        build_datamodule(compose_cfg(tmp_path, *over, "+dataset.patch_store={path: x.h5}"))

    metrics, obj = train(compose_cfg(tmp_path, *over, "tune_postprocess.enabled=false"))
    assert 0.0 <= float(metrics["test/dice"]) <= 1.0
    task = load_task(tmp_path / "checkpoints" / "last.ckpt")
    assert task.inference["scale"] == 0.5
    img = torch.rand(3, 96, 96)
    probs = task.predict_image(img)["probs"]
    assert probs.shape == (1, 96, 96)
    np.testing.assert_allclose(probs, obj["model"].eval().predict_image(img)["probs"], atol=1e-5)
