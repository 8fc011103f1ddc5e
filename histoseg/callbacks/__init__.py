"""Lightning callbacks of histoseg (enabled from ``conf/callbacks``)."""
from histoseg.callbacks.panels import ValidationPanels, render_panel

__all__ = ["ValidationPanels", "render_panel"]
