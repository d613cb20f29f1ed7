"""The one random number each sampled row uses, shared bit for bit by every backend.

Sample row i at decode step t draws ``u = philox_uniform(seed_i, t)``:

* Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) with
  key ``(seed mod 2^32, seed div 2^32)`` and counter ``(t mod 2^32, t div 2^32, 0, 0)``;
* ``u = (c0 >> 8) * 2^-24`` from the first output word: 24 bits, exact in float32, in [0, 1).

Triton, C++ and CUDA implement the same function (``tl.umulhi`` / a 64-bit product), so one (seed, step)
gives the same uniform everywhere and a token differs between backends only when the uniform falls within
rounding of a CDF boundary. This torch version works in int64 without overflow by splitting each 32-bit
multiply into 16-bit halves.
"""

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values held in int64."""
    a_hi, a_lo = a >> 16, a & _MASK16
    b_hi, b_lo = b >> 16, b & _MASK16
    low = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi
    high = a_hi * b_hi + ((mid + (low >> 16)) >> 16)
    return high & _MASK32, (((mid & _MASK16) << 16) + low) & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """Philox-4x32-10 on uint32 words stored in int64 tensors (any broadcastable shapes)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def philox_uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Uniform in [0, 1) as float64 for each (seed, step) pair; int64 tensors, broadcast together."""
    seed = seed.to(torch.int64)
    step = step.to(torch.int64)
    seed, step = torch.broadcast_tensors(seed, step)
    zero = torch.zeros_like(step)
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    counter = (step & _MASK32, (step >> 32) & _MASK32, zero, zero)
    word = philox4x32(counter, key)[0]
    return (word >> 8).to(torch.float64) * 2.0**-24
