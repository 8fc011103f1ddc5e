"""One file per backbone; importing this package registers them all.

To add a backbone: write ``histoseg/models/backbones/<name>.py`` with a class decorated by
``@register_backbone("<name>")``, import it below, and add ``conf/model/<name>.yaml``.
"""
from histoseg.models.backbones import resunet, smp, srgan_discriminator, srgan_generator, unet  # noqa: F401
