"""File helpers the data modules share (world.py, data.py, batching.py, tasks/): JSON read with errors that name
the file and line, folders generated exactly once across processes and nodes, and the one progress bar of the
project.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm


def load_json(path):
    """The JSON at path; a missing file or malformed JSON is an error naming the file (and line and column)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def generate_once(target, marker, generate, local_rank, timeout_seconds, what):
    """Make folder `target` (complete once it holds `marker`) exactly once across processes and nodes: local
    rank 0 runs generate(staging) into a hidden temporary folder beside it and renames that onto `target` in
    one atomic step (if two nodes race, the first rename wins and the loser discards its copy); every rank then
    waits for `marker`. A `target` without `marker` is refused: it is not `what` this code generates."""
    target, marker = Path(target), Path(marker)
    if target.exists() and not marker.exists():
        raise ValueError(f"{target} exists but holds no {marker.name}, so it is not {what}; delete it")
    if not target.exists() and local_rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            generate(staging)
            os.rename(staging, target)
        except OSError:
            if not marker.exists():  # not a lost race with another node: a real failure
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    deadline = time.monotonic() + timeout_seconds
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_seconds:.0f}s for local rank 0 to generate {target}")
        time.sleep(0.2)


def progress(iterable, total, desc, enabled=True):
    """`iterable` with a tqdm bar on stderr (`desc`, done/total, rate, eta) for a long step. Quiet, a plain
    pass-through, unless `enabled`, stderr is a terminal (a log file gets no carriage-return noise) and this is
    the process of global rank 0 (RANK, as torchrun sets it; read here so that it works before or without a
    process group)."""
    shown = enabled and sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0
    return tqdm(iterable, total=total, desc=desc, disable=not shown, file=sys.stderr, dynamic_ncols=True)
