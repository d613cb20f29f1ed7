"""fastbon: fast best-of-n decoding with one shared prompt KV cache and on-device sampling, scoring, selection."""

from . import ops
from .cache import SharedPrefixCache
from .dispatch import backends
from .generate import FINISH_REASONS, GenerationResult, generate
from .scoring import Pruning, Samples

__version__ = "0.1.0"
__all__ = ["FINISH_REASONS", "GenerationResult", "Pruning", "Samples", "SharedPrefixCache", "backends", "generate",
           "ops"]
