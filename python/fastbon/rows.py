"""The engine's rows: one per sample decoding now, with its KV path and the inputs of its next step."""

import torch

from .kv_blocks import BLOCK


class Row:
    """Sample ``sample`` of ``request``, decoding: ``blocks`` are its generated tokens' KV blocks (after its prompt's
    blocks on its path); ``seen`` marks its prompt's and completion's tokens when a repetition penalty applies."""

    __slots__ = ("request", "sample", "blocks", "seen")

    def __init__(self, request, sample: int, blocks: list):
        self.request, self.sample, self.blocks = request, sample, blocks
        seen = request.prompt_seen
        self.seen = None if seen is None else seen.clone()

    def sample_state(self):
        return self.request.samples[self.sample]

    def generated(self) -> int:
        return len(self.request.samples[self.sample].tokens)

    def path(self) -> list:
        return self.request.prompt_blocks + self.blocks

    def write_offset(self) -> int:
        """Where this step's key goes in the row's last block: the step feeds the row's newest token, whose key is
        the (generated - 1)-th of the row's own."""
        return (self.generated() - 1) % BLOCK

    def needs_block(self) -> bool:
        """Whether this step's key starts a new block."""
        return self.generated() - 1 >= len(self.blocks) * BLOCK

    def release(self, pool) -> None:
        for block in self.blocks:
            pool.release(block)
        self.blocks = []


def step_inputs(rows: list, device, first: bool = False):
    """The rows' ``fastbon.decode.StepInputs``: a first step feeds nothing (it samples from the prompt's logits)."""
    from .decode import StepInputs

    configs = [row.request.config for row in rows]
    generated = [0 if first else row.generated() for row in rows]

    def column(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    def subset(predicate):
        picked = [index for index, config in enumerate(configs) if predicate(config)]
        return column(picked, torch.int64) if picked else None

    penalized = any(config.repetition_penalty != 1.0 for config in configs)
    seen = None
    if penalized:  # rows without a penalty get an empty row (a penalty of 1 changes nothing anyway)
        blank = torch.zeros_like(next(row.seen for row in rows if row.seen is not None))
        seen = torch.stack([row.seen if row.seen is not None else blank for row in rows])
    return StepInputs(
        tokens=[] if first else [row.sample_state().tokens[-1] for row in rows],
        positions=[] if first else [row.request.prompt.numel() + count - 1
                                    for row, count in zip(rows, generated, strict=True)],
        temperature=column([config.temperature for config in configs], torch.float32),
        top_k=column([config.top_k for config in configs], torch.int32),
        top_p=column([config.top_p for config in configs], torch.float32),
        min_p=column([config.min_p for config in configs], torch.float32),
        seed=torch.stack([row.request.seeds[row.sample] for row in rows]).to(device),
        step=column(generated, torch.int64),
        penalty=column([[config.repetition_penalty] for config in configs], torch.float32) if penalized else None,
        seen=seen,
        processed=subset(lambda config: config.logprobs == "processed"),
        penalized_raw=subset(lambda config: config.logprobs == "raw" and config.repetition_penalty != 1.0),
        top_rows=subset(lambda config: config.top_logprobs > 0),
        top_count=max(config.top_logprobs for config in configs),
    )
