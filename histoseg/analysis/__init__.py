"""Analysis of predictions: colour palettes, nucleus morphometry and cellularity, figures, run callbacks."""
from histoseg.analysis.morphometry import cellularity, nuclei_stats
from histoseg.analysis.palette import CELLULARITY_CLASSES, CELLULARITY_PALETTE, colorize

__all__ = ["nuclei_stats", "cellularity", "colorize", "CELLULARITY_CLASSES", "CELLULARITY_PALETTE"]
