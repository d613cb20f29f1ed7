"""A data-set job in this process: the groups one after another, each written as its part."""

from dataclasses import replace

import torch

from . import parquet
from .config import BatchConfig
from .groups import Job, PromptGenerator, run_group


def run_local(config: BatchConfig, input, output, *, dtype, device, batch_prompts: int, progress: bool) -> dict:
    """Run the job ``config`` over ``input`` into ``output`` on ``device`` (default: a GPU when there is one);
    ``dtype`` None: bfloat16 on a GPU, else float32. Returns the progress meter's summary."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = replace(config, dtype=dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    table = parquet.read_input(input)
    job = Job(config, table, output, batch_prompts, progress)
    with parquet.exclusive(output):
        generator = PromptGenerator(config, device) if job.groups else None
        prompts = table[job.prompt_column].to_pylist()
        for group in job.groups:
            ids = [job.ids[position] for position in group]
            job.meter.update(**run_group(generator, output, ids, [prompts[p] for p in group], config.jsonl))
    return job.meter.summary()
