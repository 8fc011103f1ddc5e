"""Super-resolution losses: pixel, adversarial (standard and relativistic average) and perceptual.

All take images in [0, 1] (``sr`` = generator output, ``hr`` = ground truth) or discriminator logits.

* :class:`PixelLoss`: L1 or MSE.
* :class:`AdversarialLoss`: ``bce`` (SRGAN, Ledig et al. 2017) or ``relativistic`` average GAN (ESRGAN,
  Wang et al. 2018), both on raw discriminator logits.
* :class:`PerceptualLoss`: distance between feature maps of a frozen network. Pretrained VGG19 weights
  cannot be downloaded offline, so the default network is one histoseg provides itself: the *encoder*
  (``net.features(x)``) of a histoseg segmentation checkpoint; a nuclei model's features are what
  pathology SR must preserve. ``network=vgg19`` keeps the classic choice (``weights: imagenet`` or a
  state_dict path). The network is loaded lazily by :meth:`PerceptualLoss.build` (the task calls it when
  training starts), so rebuilding a trained task for inference never needs the perceptual weights; it is
  kept outside the module tree, so it is neither trained, nor put in train mode, nor saved in checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

PIXEL_KINDS = ("l1", "mse")
ADVERSARIAL_KINDS = ("bce", "relativistic")
PERCEPTUAL_NETWORKS = ("seg", "vgg19")
# ImageNet statistics for the VGG19 input
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _distance(kind: str):
    if kind == "l1":
        return F.l1_loss
    if kind == "mse":
        return F.mse_loss
    raise ValueError(f"unknown distance {kind!r}; choose one of {PIXEL_KINDS}")


class PixelLoss(nn.Module):
    """Pixel-wise ``l1`` or ``mse`` between ``sr`` and ``hr`` (mean over all elements)."""

    def __init__(self, kind: str = "l1"):
        super().__init__()
        self.fn, self.kind = _distance(kind), kind

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.fn(sr.float(), hr.float())


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class AdversarialLoss(nn.Module):
    """GAN losses on raw discriminator logits.

    ``bce``: D minimises BCE(D(hr), 1) + BCE(D(sr), 0); G minimises BCE(D(sr), 1).

    ``relativistic`` (RaGAN, ESRGAN): with C = raw logits, D_Ra(a, b) = C(a) - mean(C(b));
    D minimises [BCE(D_Ra(hr, sr), 1) + BCE(D_Ra(sr, hr), 0)] / 2 and G the symmetric
    [BCE(D_Ra(hr, sr), 0) + BCE(D_Ra(sr, hr), 1)] / 2, so the generator also gets gradients from real images.

    Args:
        kind: ``bce`` or ``relativistic``.
        real_label: target for real images in the discriminator loss (e.g. 0.9 for one-sided label smoothing).
    """

    def __init__(self, kind: str = "bce", real_label: float = 1.0):
        super().__init__()
        if kind not in ADVERSARIAL_KINDS:
            raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {ADVERSARIAL_KINDS}")
        if not 0.5 < real_label <= 1.0:
            raise ValueError(f"real_label must be in (0.5, 1], got {real_label}")
        self.kind, self.real_label = kind, float(real_label)

    @property
    def needs_real_for_generator(self) -> bool:
        return self.kind == "relativistic"

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "bce":
            return _bce(real_logits, self.real_label) + _bce(fake_logits, 0.0)
        r, f = real_logits.float(), fake_logits.float()
        return (_bce(r - f.mean(), self.real_label) + _bce(f - r.mean(), 0.0)) / 2

    def generator_loss(
        self, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.kind == "bce":
            return _bce(fake_logits, 1.0)
        if real_logits is None:
            raise ValueError(
                "the relativistic generator loss needs the discriminator logits of the real images"
            )
        r, f = real_logits.float(), fake_logits.float()
        return (_bce(r - f.mean(), 0.0) + _bce(f - r.mean(), 1.0)) / 2


class PerceptualLoss(nn.Module):
    """Feature-space distance through a frozen network (built lazily by :meth:`build`).

    Args:
        network: ``seg`` (encoder features of a histoseg segmentation checkpoint, the offline default) or
            ``vgg19`` (torchvision VGG19 ``features``).
        seg_ckpt: for ``network=seg``: path to a histoseg segmentation checkpoint (``histoseg-train``
            output); its backbone must implement ``features(x) -> list[Tensor]`` (unet, resunet, smp,
            srgan_generator do). ``None``: no perceptual term (the task logs one warning and trains with
            pixel + adversarial losses).
        vgg_weights: for ``network=vgg19``: ``imagenet`` (torchvision download) or a path to a VGG19
            ``state_dict`` (keys ``features.N.weight``, as ``torchvision.models.vgg19().state_dict()``).
        layers: which feature maps to compare: indices into the encoder's feature list for ``seg``
            (``None`` = all), indices into ``vgg19.features`` whose *outputs* are compared for ``vgg19``
            (``None`` = ``[34]``, conv5_4 before its ReLU: SRGAN's "VGG54", ESRGAN's pre-activation choice).
        criterion: ``l1`` or ``mse`` between feature maps (averaged over layers).
    """

    def __init__(
        self,
        network: str = "seg",
        seg_ckpt: str | None = None,
        vgg_weights: str = "imagenet",
        layers: Sequence[int] | None = None,
        criterion: str = "l1",
    ):
        super().__init__()
        if network not in PERCEPTUAL_NETWORKS:
            raise ValueError(f"unknown perceptual network {network!r}; choose one of {PERCEPTUAL_NETWORKS}")
        self.network, self.seg_ckpt, self.vgg_weights = network, seg_ckpt, vgg_weights
        self.layers = [int(i) for i in layers] if layers is not None else None
        self.dist = _distance(criterion)
        # a plain dict keeps the frozen net out of the module tree (not trained, not saved, stays in eval)
        self._frozen: dict[str, nn.Module] = {}
        self._normalize: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def available(self) -> bool:
        return "net" in self._frozen

    def describe(self) -> str:
        if self.network == "seg":
            return f"encoder of segmentation checkpoint {self.seg_ckpt}"
        return f"torchvision VGG19 ({self.vgg_weights}) layers {self.layers or [34]}"

    def build(self) -> bool:
        """Load the feature network. Returns ``False`` (nothing to load) when ``network=seg`` has no checkpoint."""
        if self.available:
            return True
        if self.network == "seg":
            if not self.seg_ckpt:
                return False
            net = self._load_seg_encoder(self.seg_ckpt)
        else:
            net = self._load_vgg19()
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._frozen["net"] = net
        return True

    # ------------------------------------------------------------------ networks
    @staticmethod
    def _load_seg_encoder(path: str) -> nn.Module:
        from histoseg.models.loading import load_task

        task = load_task(path)
        net = getattr(task, "net", None)
        if net is None or not callable(getattr(net, "features", None)):
            raise ValueError(
                f"{path}: the perceptual network must be a segmentation checkpoint whose backbone implements "
                f"features(x) (unet, resunet, smp, srgan_generator); got {type(net).__name__}"
            )
        return net

    def _load_vgg19(self) -> nn.Module:
        import torchvision

        idx = self.layers or [34]
        if self.vgg_weights == "imagenet":
            try:
                vgg = torchvision.models.vgg19(weights=torchvision.models.VGG19_Weights.IMAGENET1K_V1)
            except Exception as e:
                raise RuntimeError(
                    f"cannot get VGG19 ImageNet weights ({type(e).__name__}: {e}); offline, pass "
                    "perceptual.vgg_weights=<path to a VGG19 state_dict>, or use perceptual.network=seg with "
                    "perceptual.seg_ckpt=<histoseg segmentation checkpoint>"
                ) from None
            features = vgg.features
        else:
            p = Path(self.vgg_weights)
            if not p.is_file():
                raise FileNotFoundError(f"{p}: VGG19 state_dict not found (perceptual.vgg_weights)")
            # the convolutional part only (the 120M-parameter classifier is never used)
            features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"], batch_norm=False)
            state = torch.load(p, map_location="cpu", weights_only=True)
            if any(k.startswith("features.") for k in state):
                state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
            missing, _ = features.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"{p}: not a VGG19 state_dict (missing {missing[:3]})")
        for m in features:  # an in-place ReLU would overwrite a tapped conv output
            if isinstance(m, nn.ReLU):
                m.inplace = False
        n = len(features)
        if any(not 0 <= i < n for i in idx):
            raise ValueError(f"VGG19 feature layers must be in [0, {n - 1}], got {idx}")
        self._normalize = (
            torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1),
            torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1),
        )
        return _TapLayers(features[: max(idx) + 1], idx)

    # ------------------------------------------------------------------ loss
    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self._frozen["net"]
        if self._normalize is not None:
            mean, std = (t.to(x.device) for t in self._normalize)
            x = (x - mean) / std
        feats = net.features(x)
        if self.network == "seg" and self.layers is not None:
            if any(not -len(feats) <= i < len(feats) for i in self.layers):
                raise ValueError(
                    f"perceptual layers {self.layers} out of range for {len(feats)} encoder features"
                )
            feats = [feats[i] for i in self.layers]
        return feats

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if not self.available:
            raise RuntimeError("PerceptualLoss.build() was not called (or found no network)")
        net = self._frozen["net"]
        ref = next(net.parameters())
        if ref.device != sr.device:
            net.to(sr.device)
        with torch.no_grad():
            target = self._features(hr)
        pred = self._features(sr)
        return sum(self.dist(p.float(), t.float()) for p, t in zip(pred, target)) / len(pred)


class _TapLayers(nn.Module):
    """``features(x)``: outputs of the given indices of a Sequential (VGG feature taps)."""

    def __init__(self, seq: nn.Sequential, idx: Sequence[int]):
        super().__init__()
        self.seq, self.idx = seq, sorted(set(int(i) for i in idx))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.seq):
            x = layer(x)
            if i in self.idx:
                out.append(x)
        return out
