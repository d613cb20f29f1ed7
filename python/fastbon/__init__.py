"""fastbon: fast best-of-n decoding with one shared prompt KV cache and on-device sampling, scoring, selection.

The public names load on first use, so ``import fastbon`` (and ``fastbon --help``) loads neither torch nor
transformers; the first ``fastbon.generate`` pays for them (docs/benchmarks.md has the times).
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"
# Each public name and the module that defines it.
_EXPORTS = {"FINISH_REASONS": "generate", "GenerationResult": "generate", "Pruning": "scoring", "Samples": "scoring",
            "SamplingConfig": "config", "Engine": "engine", "Request": "request", "StreamEvent": "request",
            "Cancelled": "request", "backends": "dispatch"}
__all__ = sorted([*_EXPORTS, "generate", "ops"])


def __getattr__(name):
    """A public name, or a module of the package (``fastbon.scoring.verifier`` after ``import fastbon``)."""
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``fastbon.generate`` is the function, though the module that defines it has the same name: the import system
    sets a package's attribute to each of its modules as it loads them (``fastbon.search`` loads this one), so the
    name is a property that the module's binding does not replace."""

    @property
    def generate(self):
        from .generate import generate

        return generate

    @generate.setter
    def generate(self, module):
        """The import system binding the module ``fastbon.generate``: reached through ``sys.modules`` instead."""


sys.modules[__name__].__class__ = _Package
