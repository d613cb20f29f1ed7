"""Seeds: each sample's Philox seed, drawn from a request's seed alone."""

import torch

from .config import check_int


def check_seed(seed, num_prompts: int | None = None) -> None:
    """``seed`` is None, an int, or one int per prompt."""
    if seed is None:
        return
    if isinstance(seed, (list, tuple)):
        if num_prompts is not None and len(seed) != num_prompts:
            raise ValueError(f"seed must hold one int per prompt ({num_prompts}), got {len(seed)}")
        for position, value in enumerate(seed):
            check_int(f"seed[{position}]", value)
        return
    if isinstance(seed, torch.Tensor):
        raise TypeError("seed must be an int, a list of ints (one per prompt) or None, got a tensor: pass .tolist()")
    check_int("seed", seed)


def sample_seeds(seed, num_prompts: int, n: int) -> torch.Tensor:
    """The Philox seed of each of the B·n samples (prompt-major). With one seed per prompt, prompt b's n seeds come
    from ``seed[b]`` alone — what an int seed gives a batch of one prompt — so its samples never depend on which
    prompts share its batch."""
    def draw(count, value):
        generator = torch.Generator().manual_seed(value) if value is not None else None
        return torch.randint(-(2**63), 2**63 - 1, (count,), generator=generator, dtype=torch.int64)

    if isinstance(seed, (list, tuple)):
        return torch.cat([draw(n, value % 2**64) for value in seed])
    return draw(num_prompts * n, None if seed is None else seed % 2**64)
