"""minidpo: Direct Preference Optimization, small enough to read.

The public API (DESIGN.md) is re-exported here and loads on first use: ``minidpo.preference_loss`` imports
torch then, ``minidpo.load_preferences`` datasets, ``minidpo.derivations`` sympy. So ``import minidpo`` (and
``minidpo --help``) costs nothing until something is used.
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it, imported lazily on first attribute access
_LAZY = {
    "preference_loss": "losses",
    "simpo_loss": "losses",
    "orpo_loss": "losses",
    "kto_loss": "losses",
    "sequence_logps": "logps",
    "optimal_policy": "bandit",
    "rlhf_objective": "bandit",
    "implicit_reward": "bandit",
    "load_preferences": "data",
    "validate_preferences": "data",
    "tokenize_preferences": "data",
    "TokenizeReport": "data",
    "PreferenceCollator": "data",
    "PROMPT_COLUMNS": "data",
    "check_step": "derivations",
}

__all__ = list(_LAZY)


_SUBMODULES = ("bandit", "cli", "data", "derivations", "evaluate", "experiment", "grading", "logps", "losses",
               "models", "plots", "profiling", "tokenizer", "train", "world")


def __getattr__(name: str):
    if name in _SUBMODULES:  # minidpo.derivations etc. without an explicit import (sympy loads only then)
        return import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minidpo' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion shows the lazy names too
    return sorted([*globals(), *_LAZY, *_SUBMODULES])
