"""Hyper-parameter search for fine-tuning with Optuna: `space` (the search space as TOML data) and
`study` (the study, its storage and the objective). `tune(...)` is the library behind `m2dx tune`.
"""

from .space import Param, load_search_space, params_to_tables, parse_duration, suggest
from .study import TuneJob, TuneResult, make_pruner, make_storage, tune

__all__ = ["Param", "TuneJob", "TuneResult", "load_search_space", "make_pruner", "make_storage", "params_to_tables",
           "parse_duration", "suggest", "tune"]
