"""Philox-4x32-10 in Triton: the uniform every sampled row draws, bit-identical to ``fastbon.ops.philox`` (torch),
``csrc/common/philox.h`` (C++/CUDA); tests compare them bit for bit.

The constants are the published Philox-4x32 ones (Salmon et al., SC'11), written here so this leaf imports nothing
from fastbon.
"""

import triton
import triton.language as tl

# Globals a @triton.jit body reads must be constexpr (the GPU compiler rejects plain ints; the interpreter does not).
ROUND_A = tl.constexpr(0xD2511F53)
ROUND_B = tl.constexpr(0xCD9E8D57)
KEY_A = tl.constexpr(0x9E3779B9)
KEY_B = tl.constexpr(0xBB67AE85)
ROUNDS = tl.constexpr(10)


@triton.jit
def philox_uniform(seed, step):
    """u = (c0 >> 8) * 2^-24 of Philox-4x32-10 with key (seed lo32, seed hi32), counter (step lo32, step hi32, 0, 0).

    The 64-bit products are split into umulhi (high word) and a wrapping uint32 multiply (low word).
    """
    key0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    key1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (step & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    round_a = tl.zeros_like(c0) + ROUND_A
    round_b = tl.zeros_like(c0) + ROUND_B
    for _ in tl.static_range(ROUNDS):
        high_b = tl.umulhi(round_b, c2)
        low_b = round_b * c2
        high_a = tl.umulhi(round_a, c0)
        low_a = round_a * c0
        c0, c1, c2, c3 = high_b ^ c1 ^ key0, low_b, high_a ^ c3 ^ key1, low_a
        key0 = key0 + KEY_A
        key1 = key1 + KEY_B
    return (c0 >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: exact
