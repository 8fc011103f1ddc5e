"""Inference: one tiled predictor, test-time augmentation, post-processing."""
from histoseg.inference.tiled import (
    TileSource,
    gaussian_weights,
    tile_batches,
    tile_starts,
    tiled_predict,
    with_tta,
)

__all__ = ["tiled_predict", "gaussian_weights", "tile_starts", "tile_batches", "with_tta", "TileSource"]
