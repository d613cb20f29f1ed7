"""fastbon: fast best-of-n decoding with one shared prompt KV cache and on-device sampling, scoring, selection."""

from .dispatch import backends

__version__ = "0.1.0"
__all__ = ["backends"]
