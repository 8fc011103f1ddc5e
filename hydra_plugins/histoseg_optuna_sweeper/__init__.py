"""Hydra sweeper on modern Optuna (``hydra/sweeper=histoseg_optuna``).

Hydra finds this package because ``hydra_plugins`` is a namespace package: Hydra imports every module
under it and registers the config below in its ConfigStore. See :mod:`.sweeper` for the behaviour.
"""
from hydra_plugins.histoseg_optuna_sweeper.config import HistosegOptunaSweeperConf  # noqa: F401  (registers)
