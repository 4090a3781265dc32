"""minidpo: Direct Preference Optimization, small enough to read.

The public API (DESIGN.md) is re-exported here. ``losses`` and ``logps`` need only torch and are imported at
once; the rest (transformers, datasets, sympy) loads on first use, so ``import minidpo`` stays quick.
"""

from importlib import import_module

from .logps import sequence_logps
from .losses import kto_loss, orpo_loss, preference_loss, simpo_loss

__version__ = "0.1.0"

# name -> module that defines it, imported lazily on first attribute access
_LAZY = {
    "optimal_policy": "bandit",
    "rlhf_objective": "bandit",
    "implicit_reward": "bandit",
    "load_preferences": "data",
    "validate_preferences": "data",
    "tokenize_preferences": "data",
    "TokenizeReport": "data",
    "PreferenceCollator": "data",
    "PROMPT_COLUMNS": "data",
}

__all__ = ["preference_loss", "simpo_loss", "orpo_loss", "kto_loss", "sequence_logps", *_LAZY]


_SUBMODULES = ("bandit", "data", "derivations", "evaluate", "experiment", "models", "plots", "tokenizer", "train",
               "world")


def __getattr__(name: str):
    if name in _SUBMODULES:  # minidpo.derivations etc. without an explicit import (sympy loads only then)
        return import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minidpo' has no attribute {name!r}")
