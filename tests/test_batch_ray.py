"""``fastbon batch`` on Ray Data, on a real local cluster (2 CPUs): the same rows as the local path on 2 workers
with one killed mid-run (Ray retries its group) and on 1 worker resuming that output."""

import json
import os
import signal
import threading
import time

import pytest

from fastbon import jobs
from fastbon.jobs import parquet
from fastbon.models.arithmetic import make_problems

psutil = pytest.importorskip("psutil")
ray = pytest.importorskip("ray", reason="the Ray runner needs the ray extra: pip install 'fastbon[ray]'")

JOB = dict(n=3, k=2, max_new_tokens=5, seed=3, batch_prompts=4)
PROMPTS, GROUPS = 24, 6  # one part per group


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray_input") / "prompts.jsonl"
    with open(path, "w") as handle:
        for position, (prompt, _) in enumerate(make_problems(PROMPTS, 21)):
            handle.write(json.dumps({"id": f"p{position}", "prompt": prompt}) + "\n")
    return path


@pytest.fixture(scope="module")
def local_rows(prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    jobs.run(prompts_file, out, progress=False, **JOB)
    return rows_of(out)


def rows_of(folder):
    return sorted(parquet.read_output(folder).to_pylist(), key=lambda row: (row["id"], row["rank"]))


def map_workers():
    """This test's Ray actor processes running map_batches (the local cluster's processes descend from this one)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::MapWorker"):
                found.append(process)
        except psutil.Error:  # a process that ended while we looked
            continue
    return found


def test_a_killed_worker_then_a_resume_on_one_worker_equal_the_local_path(cluster, prompts_file, local_rows,
                                                                          tmp_path):
    """2 workers, one SIGKILLed after the first part: Ray restarts it and reruns its group; then three parts are
    deleted and a rerun on 1 worker writes exactly those. Every stage's rows are bit-identical to the local path."""
    out = tmp_path / "out"
    killed = []

    def kill_a_worker_after_the_first_part():
        deadline = time.monotonic() + 300
        while not parquet.part_paths(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = map_workers()
        if workers:
            killed.append((workers[0].pid, len(parquet.part_paths(out))))
            os.kill(workers[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_the_first_part)
    killer.start()
    summary = jobs.run(prompts_file, out, ray=True, workers=2, progress=False, **JOB)
    killer.join()
    assert killed and killed[0][1] < GROUPS, "a worker died while parts were missing"
    assert not psutil.pid_exists(killed[0][0]) or psutil.Process(killed[0][0]).status() == psutil.STATUS_ZOMBIE
    assert summary["prompts"] == PROMPTS and summary["parts"] == GROUPS
    assert rows_of(out) == local_rows, "every prompt exactly once, bit-identical to the local path"

    for part in parquet.part_paths(out)[:3]:
        part.unlink()
    kept = {part.name: part.stat().st_mtime_ns for part in parquet.part_paths(out)}
    summary = jobs.run(prompts_file, out, ray=True, workers=1, progress=False, **JOB)
    assert summary["prompts"] == 3 * JOB["batch_prompts"] and summary["skipped"] == PROMPTS - 3 * JOB["batch_prompts"]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept, "finished parts were not rewritten"
    assert rows_of(out) == local_rows


def test_bad_input_read_by_ray_is_refused_before_any_work(cluster, tmp_path):
    (tmp_path / "garbage.jsonl").write_text("{not json\n")
    (tmp_path / "duplicates.jsonl").write_text('{"id": 4, "prompt": "1+2="}\n{"id": 4, "prompt": "3+4="}\n')
    for name, message in (("missing.jsonl", "cannot read .*FileNotFoundError"), ("garbage.jsonl", "cannot read"),
                          ("duplicates.jsonl", r"duplicate ids \[4\]")):
        with pytest.raises(ValueError, match=message):
            jobs.run(tmp_path / name, tmp_path / "out", ray=True, progress=False, **JOB)
    assert not (tmp_path / "out").exists()
