"""The files of a data-set job (``fastbon.jobs``): the input table, the manifest, and the output parts.

An output folder holds ``_manifest.json`` (the job configuration that decides the samples) and ``part-<key>.parquet``
files, one per group of prompts, each with every returned row of those prompts. A part is written to a hidden
temporary name in the same folder, fsynced and renamed over its final name, so a part either exists whole or not at
all: a job killed at any moment leaves only whole parts, and a rerun skips exactly the prompts they hold. Names
starting with ``_`` or ``.`` are what Arrow's data-set readers skip, so ``pyarrow.dataset.dataset(folder)`` (and
``ray.data.read_parquet``) read the parts alone. Needs ``pyarrow`` (``pip install fastbon[ray]``).
"""

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow

MANIFEST = "_manifest.json"
PART_PREFIX = "part-"
TEMPORARY_PREFIX = ".tmp-"
LOCK = ".lock"
JSONL_FOLDER = "_jsonl"  # skipped by Arrow's discovery like the manifest, so the folder reads as Parquet
FORMAT_VERSION = 1


def pyarrow_modules():
    """(pyarrow, pyarrow.compute, pyarrow.json, pyarrow.parquet), or an ImportError that names the extra."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.json
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError("fastbon.jobs reads and writes Parquet with pyarrow: pip install 'fastbon[ray]'") from error
    return pyarrow, pyarrow.compute, pyarrow.json, pyarrow.parquet


def read_input(path) -> "pyarrow.Table":
    """The input table (JSONL or Parquet) after ``check_input``; every problem is one ValueError naming the file,
    before any work."""
    pyarrow, _, pyarrow_json, parquet = pyarrow_modules()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input: {path} is not a readable file")
    input_format(path)
    try:
        table = parquet.read_table(path) if path.suffix == ".parquet" else pyarrow_json.read_json(path)
    except (pyarrow.ArrowInvalid, OSError) as error:
        raise ValueError(f"input: cannot read {path}: {error}") from error
    return check_input(table, f"input: {path}")


def input_format(path) -> str:
    suffix = Path(str(path)).suffix
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"input: {path} must end in .jsonl or .parquet")
    return "parquet" if suffix == ".parquet" else "json"


def check_input(table, where: str) -> "pyarrow.Table":
    """``table`` with an ``id`` column (the row number when it has none, int64 or string) after checking it has a
    ``prompt`` (text) or ``messages`` column without gaps and unique ids."""
    pyarrow, compute, _, _ = pyarrow_modules()
    if "prompt" not in table.column_names and "messages" not in table.column_names:
        raise ValueError(f"{where} has no 'prompt' column (nor 'messages' for chat models); its columns are "
                         f"{table.column_names}")
    text_column = "prompt" if "prompt" in table.column_names else "messages"
    if table[text_column].null_count:
        row = compute.index(compute.is_null(table[text_column]), True).as_py()
        raise ValueError(f"{where}: row {row} has no {text_column!r}")
    if text_column == "prompt" and not pyarrow.types.is_string(table["prompt"].type) and not (
            pyarrow.types.is_large_string(table["prompt"].type)):
        raise ValueError(f"{where}: column 'prompt' must hold text, got {table['prompt'].type}")
    if "id" not in table.column_names:
        table = table.append_column("id", pyarrow.array(range(table.num_rows), pyarrow.int64()))
    check_ids(table["id"], where)
    # One id type per kind, so every part of a job (and of its resumes) has the same schema.
    id_type = pyarrow.int64() if pyarrow.types.is_integer(table["id"].type) else pyarrow.string()
    return table.set_column(table.column_names.index("id"), "id", table["id"].cast(id_type))


def check_ids(ids, where: str) -> None:
    """Ids must be integers or strings, present, and unique: a duplicate would be generated twice."""
    pyarrow, compute, _, _ = pyarrow_modules()
    kind = ids.type
    if not (pyarrow.types.is_integer(kind) or pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise ValueError(f"{where}: column 'id' must hold integers or strings, got {kind}")
    if ids.null_count:
        raise ValueError(f"{where}: column 'id' has {ids.null_count} missing values")
    counts = compute.value_counts(ids)
    repeated = compute.filter(counts.field("values"), compute.greater(counts.field("counts"), 1))
    if len(repeated):
        raise ValueError(f"{where}: duplicate ids {repeated.to_pylist()[:5]} (each prompt needs its own id)")


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, write) -> None:
    """Write ``path`` whole or not at all: ``write(handle)`` fills a temporary file in the same folder, which is
    fsynced and renamed over ``path`` (a rename within one file system is atomic)."""
    temporary = path.parent / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{path.name}"
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def part_key(ids) -> str:
    """The part name of a group of prompts, from their ids: a retried group rewrites the same part."""
    return hashlib.sha256(json.dumps([_plain(i) for i in ids]).encode()).hexdigest()[:20]


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def write_part(folder, key: str, table, jsonl: bool) -> Path:
    """Write one group's rows as ``part-<key>.parquet`` (and ``_jsonl/part-<key>.jsonl`` first: the Parquet
    part is the commit mark a rerun trusts, so its JSONL twin always exists when it does)."""
    _, _, _, parquet = pyarrow_modules()
    folder = Path(folder)
    if jsonl:
        rows = "".join(json.dumps(row) + "\n" for row in table.to_pylist())
        (folder / JSONL_FOLDER).mkdir(exist_ok=True)
        write_atomically(folder / JSONL_FOLDER / f"{PART_PREFIX}{key}.jsonl", lambda h: h.write(rows.encode()))
    path = folder / f"{PART_PREFIX}{key}.parquet"
    write_atomically(path, lambda handle: parquet.write_table(table, handle))
    return path


def part_paths(folder) -> list:
    return sorted(Path(folder).glob(f"{PART_PREFIX}*.parquet"))


def finished_prompts(folder) -> dict:
    """{id: prompt text} of every prompt in the finished parts of ``folder``."""
    _, _, _, parquet = pyarrow_modules()
    done = {}
    for path in part_paths(folder):
        table = parquet.read_table(path, columns=["id", "prompt"])
        done.update(zip(table["id"].to_pylist(), table["prompt"].to_pylist(), strict=True))
    return done


def read_output(folder) -> "pyarrow.Table":
    """Every row of a job's output folder as one table (the parts in name order)."""
    pyarrow, _, _, parquet = pyarrow_modules()
    paths = part_paths(folder)
    if not paths:
        raise ValueError(f"output: {folder} holds no finished parts")
    return pyarrow.concat_tables([parquet.read_table(path) for path in paths])


def check_manifest(folder, manifest: dict) -> None:
    """Refuse an output folder written by another configuration (naming each setting that differs), or one
    that is not a fastbon batch folder; an absent or empty folder is fine. Reads only."""
    folder = Path(folder)
    manifest = {"format": FORMAT_VERSION, **manifest}
    path = folder / MANIFEST
    if path.exists():
        written = json.loads(path.read_text())
        differences = [f"{name}: {written.get(name)!r} there, {manifest.get(name)!r} now"
                       for name in sorted(set(written) | set(manifest)) if written.get(name) != manifest.get(name)]
        if differences:
            raise ValueError(f"output: {folder} was written by a different configuration, refusing to resume "
                             f"({'; '.join(differences)}); use another output folder")
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"output: {folder} is not an empty folder and holds no {MANIFEST}: not a fastbon batch "
                         "output")


def prepare_output(folder, manifest: dict) -> None:
    """Create the output folder and its manifest (after ``check_manifest``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    if not path.exists():
        text = json.dumps({"format": FORMAT_VERSION, **manifest}, indent=2, sort_keys=True).encode()
        write_atomically(path, lambda handle: handle.write(text))


@contextlib.contextmanager
def exclusive(folder):
    """Hold the output folder for one job: a second job on it is refused (it would delete the first one's
    temporary files, and with other groups could write a prompt twice). An advisory ``flock``, which the kernel
    drops when its process dies, so a killed job leaves nothing to clean up. Then the temporary files a killed
    job left behind are removed."""
    import fcntl

    folder = Path(folder)
    handle = open(folder / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"output: another fastbon batch job is writing to {folder}") from None
    try:
        for leftover in [*folder.glob(f"{TEMPORARY_PREFIX}*"), *folder.glob(f"{JSONL_FOLDER}/{TEMPORARY_PREFIX}*")]:
            leftover.unlink()
        yield
    finally:
        handle.close()


def fingerprint_folder(folder) -> str:
    """A cheap content fingerprint of a model folder: every file's name, size and first and last MiB (weights of
    two different checkpoints differ there; hashing many GB whole would cost minutes)."""
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(2**20))
            if size > 2**21:
                handle.seek(-(2**20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:20]
