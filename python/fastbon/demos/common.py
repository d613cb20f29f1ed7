"""What the demos and the benchmark share: the default device, timing fences, CSV output."""

import csv

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device) -> None:
    """Wait for the device's queued work, so a wall time covers it (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def write_csv(rows, path, fields) -> None:
    """Rows (dicts) as CSV, floats to 4 significant digits."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.4g}" if isinstance(value, float) else value for key, value in row.items()})
