"""Launch helpers shared by the kernel launchers."""

import os

import torch


def interpreted(tensor: torch.Tensor) -> bool:
    """True when Triton runs ``tensor``'s kernels in its interpreter (CPU tensors, ``TRITON_INTERPRET=1``).

    The interpreter runs programs one after another and every ``tl`` op as a NumPy call, so its cost is per op
    and per program, not per element: launchers pick much bigger tiles and fewer programs there.
    """
    return tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
