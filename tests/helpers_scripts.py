"""Load a script under experiments/ (not a package) as a module, for its tests."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_experiment_script(name: str):
    """``experiments/<name>.py`` as a module registered under ``name`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
