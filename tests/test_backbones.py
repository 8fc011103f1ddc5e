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
