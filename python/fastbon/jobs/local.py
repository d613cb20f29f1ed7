"""A data-set job in this process: every group streams through one engine, and each group's part is written as soon
as its prompts complete."""

from dataclasses import replace

import torch

from . import parquet
from .config import BatchConfig
from .groups import Job, PromptGenerator, write_group


def run_local(config: BatchConfig, input, output, *, dtype, device, batch_prompts: int, progress: bool) -> dict:
    """Run the job ``config`` over ``input`` into ``output`` on ``device`` (default: a GPU when there is one);
    ``dtype`` None: bfloat16 on a GPU, else float32. Returns the progress meter's summary.

    Groups are submitted ahead while the engine could start their rows soon (twice its rows in flight), so rows
    freed by one group's samples are taken by the next group's at the next step."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = replace(config, dtype=dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    table = parquet.read_input(input)
    job = Job(config, table, output, batch_prompts, progress)
    with parquet.exclusive(output):
        if not job.groups:
            return job.meter.summary()
        generator = PromptGenerator(config, device)
        engine, prompts = generator.engine, table[job.prompt_column].to_pylist()
        waiting, running = list(job.groups), []
        while waiting or running:
            in_flight = sum(len(group.ids) for group in running) * config.n
            while waiting and (not running or in_flight < 2 * engine.max_rows):
                positions = waiting.pop(0)
                running.append(generator.submit([job.ids[p] for p in positions], [prompts[p] for p in positions]))
                in_flight += len(positions) * config.n
            engine.step()
            for group in [group for group in running if group.done()]:
                running.remove(group)
                job.meter.update(**write_group(generator, output, group, config.jsonl))
    return job.meter.summary()
