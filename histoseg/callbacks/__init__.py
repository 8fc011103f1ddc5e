"""Lightning callbacks of histoseg (enabled from ``conf/callbacks``)."""
from histoseg.callbacks.budget import TimeBudget
from histoseg.callbacks.checkpoint import ModelCheckpoint
from histoseg.callbacks.clock import WallClock
from histoseg.callbacks.ema import EMA
from histoseg.callbacks.panels import ValidationPanels, render_panel

__all__ = ["EMA", "ModelCheckpoint", "TimeBudget", "ValidationPanels", "WallClock", "render_panel"]
