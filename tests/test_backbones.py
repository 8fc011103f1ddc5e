"""One backbone contract, parametrised over the registry: shapes, a learning step, shape errors."""
import pytest
import torch

from histoseg.losses import CrossEntropyLoss
from histoseg.models.registry import available_backbones, build_backbone, check_input_shape

# small settings per backbone so the contract runs fast; a new backbone runs with its defaults
SMALL = {
    "unet": dict(depth=3, width=8),
    "resunet": dict(depth=2, width=8),
    "smp": dict(encoder_name="resnet18", encoder_depth=3, decoder_channels=[32, 16, 8]),
    "srgan_generator": dict(scale=1, width=16, depth=2),
}
SEG_BACKBONES = [n for n in available_backbones() if n != "srgan_discriminator"]


@pytest.mark.parametrize("classes", [1, 4], ids=["binary", "4class"])
@pytest.mark.parametrize("name", SEG_BACKBONES)
class TestBackboneContract:
    def build(self, name, classes):
        torch.manual_seed(0)
        return build_backbone(name, in_channels=3, num_classes=classes, **SMALL.get(name, {}))

    def test_output_shape_is_logits_per_pixel(self, name, classes):
        net = self.build(name, classes).eval()
        x = torch.rand(2, 3, 64, 64)
        y = net(x)
        assert y.shape == (2, classes, 64 * net.scale, 64 * net.scale)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()

    def test_one_step_lowers_loss_on_a_fixed_batch(self, name, classes):
        net = self.build(name, classes).train()
        g = torch.Generator().manual_seed(1)
        x = torch.rand(4, 3, 64, 64, generator=g)
        target = (x[:, 0] > 0.5).long() if classes == 1 else (x[:, 0] * 3.999).long()
        loss_fn = CrossEntropyLoss("binary" if classes == 1 else "multiclass")
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        loss = loss_fn(net(x), target)
        loss.backward()
        opt.step()
        with torch.no_grad():  # same batch, same (train-mode) normalisation: only the weights changed
            after = loss_fn(net(x), target)
        assert after.item() < loss.item()

    def test_declares_contract_attributes(self, name, classes):
        net = self.build(name, classes)
        assert net.in_channels == 3 and net.num_classes == classes
        assert isinstance(net.scale, int) and isinstance(net.divisor, int)


def test_bad_input_shape_names_the_padding():
    net = build_backbone("unet", depth=3, width=4)
    with pytest.raises(ValueError, match=r"pad to 72x64"):
        check_input_shape(net, 70, 64)
    with pytest.raises(ValueError, match="pad to 72x64"):
        net(torch.rand(1, 3, 70, 64))


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(KeyError, match="available: .*resunet.*unet"):
        build_backbone("unetz")


SMALL_SMP = dict(encoder_name="resnet18", encoder_depth=3, decoder_channels=[32, 16, 8])


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_smp_full_res_skip_gives_full_resolution_logits_and_trains_every_parameter(arch):
    # FPN decodes at stride 4: the full-resolution head resizes its output to the image (FPN at its default depth:
    # smp's own FPN with encoder_depth=3 returns 4x the input size)
    kw = dict(encoder_name="resnet18") if arch == "FPN" else SMALL_SMP
    x = torch.rand(2, 3, 64, 64)
    unused = {}
    for width in (0, 8):
        torch.manual_seed(0)
        net = build_backbone("smp", in_channels=3, num_classes=3, arch=arch, full_res_skip=width, **kw).train()
        y = net(x)
        assert y.shape == (2, 3, 64, 64)
        y.square().mean().backward()
        unused[width] = {n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    # smp keeps the encoder stages beyond encoder_depth unused in both; the full-resolution level adds none,
    # and smp's replaced class head leaves no parameter behind (DDP fails on unused parameters)
    assert unused[8] == unused[0] and not any(n.startswith("full_res") for n in unused[8])
    assert not any(n.startswith("model.segmentation_head") for n, _ in net.named_parameters())


def test_smp_full_res_skip_zero_keeps_smps_model_and_checkpoint_keys():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    net = build_backbone("smp", in_channels=3, num_classes=2, **SMALL_SMP)
    ref = smp.create_model("Unet", encoder_weights=None, in_channels=3, classes=2, **SMALL_SMP)
    assert list(net.state_dict()) == ["model." + k for k in ref.state_dict()]
    ref.load_state_dict({k[len("model."):]: v for k, v in net.state_dict().items()})
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(net.eval()(x), ref.eval()(x))


def test_smp_full_res_head_sees_single_pixel_detail_at_full_resolution():
    # the stem's two 3x3 convolutions reach the head unpooled: with the decoder's contribution zeroed, a one-pixel
    # change moves the logits only within the 9x9 window around it (four 3x3 convolutions: radius 4)
    torch.manual_seed(0)
    net = build_backbone("smp", in_channels=3, num_classes=1, full_res_skip=4, **SMALL_SMP).eval()
    x = torch.rand(1, 3, 64, 64)
    zero_dec = torch.zeros(1, 8, 64, 64)
    x2 = x.clone()
    x2[0, :, 30, 41] += 1.0
    d = (net.full_res(x2, zero_dec) - net.full_res(x, zero_dec)).abs()[0, 0]
    changed = torch.nonzero(d > 0)
    assert len(changed) > 0
    assert changed[:, 0].min() >= 26 and changed[:, 0].max() <= 34
    assert changed[:, 1].min() >= 37 and changed[:, 1].max() <= 45
    assert d[30, 41] > 0


def test_smp_negative_full_res_skip_is_refused():
    with pytest.raises(ValueError, match="full_res_skip"):
        build_backbone("smp", in_channels=3, num_classes=2, full_res_skip=-1, **SMALL_SMP)
