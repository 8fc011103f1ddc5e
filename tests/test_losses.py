"""Loss sanity: perfect predictions reach the minimum, modes are checked, weights follow N / N_i."""
import hydra
import pytest
import torch
from omegaconf import OmegaConf

from histoseg.losses import BCEWithLogitsLoss, CrossEntropyLoss, DiceCELoss
from histoseg.losses.functional import class_weights_from_counts
from histoseg.utils.config import conf_dir

# single-head segmentation losses; the multi-head ones (mh_*) are tested below
LOSSES = sorted(p.stem for p in (conf_dir() / "loss").glob("*.yaml") if not p.stem.startswith("mh_"))
MH_LOSSES = sorted(p.stem for p in (conf_dir() / "loss").glob("mh_*.yaml"))


def build(name, mode):
    cfg = OmegaConf.load(conf_dir() / "loss" / f"{name}.yaml")
    cfg.mode = mode
    loss = hydra.utils.instantiate(cfg)
    if getattr(loss, "needs_class_weights", False):
        loss.set_class_weights([100, 30, 20, 10][: 2 if mode == "binary" else 4])
    return loss


def perfect_logits(target, k, scale=20.0):
    if k == 1:
        return (target.float() * 2 - 1).unsqueeze(1) * scale
    return torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float() * 2 * scale - scale


CASES = [(n, m, k) for n in LOSSES for m, k in (("binary", 1), ("multiclass", 4)) if not (n == "bce" and k == 4)]


@pytest.mark.parametrize("name,mode,k", CASES)
def test_perfect_prediction_is_the_minimum(name, mode, k):
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2 if k == 1 else k, (2, 16, 16), generator=g)
    loss = build(name, mode)
    best = loss(perfect_logits(target, k), target)
    wrong = loss(perfect_logits((target + 1) % (2 if k == 1 else k), k), target)
    rand = loss(torch.randn(2, k, 16, 16, generator=g), target)
    assert best.item() < rand.item() < wrong.item() + 1e-6
    assert best.item() == pytest.approx(0.0, abs=1e-3)


def test_binary_only_loss_rejects_multiclass():
    with pytest.raises(ValueError, match="supports only binary"):
        BCEWithLogitsLoss("multiclass")


def test_class_weights_are_n_over_ni():
    w = class_weights_from_counts([80, 15, 5, 0])
    assert torch.allclose(w, torch.tensor([100 / 80, 100 / 15, 100 / 5, 0.0]))


def test_weighted_ce_emphasises_rare_classes():
    target = torch.tensor([[[0, 0, 0, 1]]])
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, 3] = -2.0  # the rare class pixel is wrong
    plain = CrossEntropyLoss("multiclass")(logits, target)
    weighted = CrossEntropyLoss("multiclass", weight=[1.0, 3.0])(logits, target)
    assert weighted > plain


def test_auto_weights_must_be_set_before_use():
    loss = CrossEntropyLoss("binary", weight="auto")
    with pytest.raises(RuntimeError, match="set_class_weights"):
        loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_dice_ce_zero_weight_skips_a_term():
    t = torch.randint(0, 2, (1, 8, 8))
    x = torch.randn(1, 1, 8, 8)
    only_ce = DiceCELoss("binary", weight_dice=0.0)(x, t)
    assert only_ce == pytest.approx(CrossEntropyLoss("binary")(x, t).item())


@pytest.mark.parametrize("name", MH_LOSSES)
def test_multihead_loss_is_minimal_for_perfect_heads(name):
    from histoseg.data.targets import InstanceTargets

    loss = hydra.utils.instantiate(OmegaConf.load(conf_dir() / "loss" / f"{name}.yaml"))
    inst = torch.zeros(2, 32, 32, dtype=torch.int32)
    inst[:, 4:14, 4:14] = 1
    inst[:, 14:26, 10:22] = 2
    kinds = ["three_class" if "three_class" in name else "binary", "distance", "hv"]
    tg = [InstanceTargets(kinds)(inst[i] > 0, inst[i]) for i in range(2)]
    batch = {k: torch.stack([t[k] for t in tg]) for k in tg[0]}
    batch["mask"] = (inst > 0).long()
    k = 3 if "three_class" in name else 1
    perfect = {"seg": perfect_logits(batch["seg"], k), "dist": batch["dist"], "hv": batch["hv"]}
    noisy = {h: v + 25 * torch.randn_like(v.float()) for h, v in perfect.items()}
    best, worse = loss(perfect, batch), loss(noisy, batch)
    assert best.item() < worse.item()
    assert best.item() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("mode,k", [("binary", 1), ("multiclass", 3)])
def test_lovasz_ignores_ignore_index_pixels(mode, k):
    from histoseg.losses import LovaszLoss

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2 if k == 1 else k, (2, 16, 16), generator=g)
    target[:, :4] = 255  # unsupervised rows (e.g. a nucleus interior whose instance map is unknown)
    logits = torch.randn(2, k, 16, 16, generator=g)
    loss = LovaszLoss(mode, ignore_index=255)
    changed = logits.clone()
    changed[:, :, :4] = 50 * torch.randn(2, k, 4, 16, generator=g)  # anything at ignored pixels
    assert loss(changed, target).item() == pytest.approx(loss(logits, target).item(), abs=1e-6)
    # and the supervised pixels do count: flipping them to the truth lowers the loss
    fixed = logits.clone()
    sup = target[:, 4:]
    fixed[:, :, 4:] = perfect_logits(sup, k)
    assert loss(fixed, target).item() < loss(logits, target).item()
