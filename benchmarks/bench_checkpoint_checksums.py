"""What checked checkpoint bytes cost: SHA-256 over a checkpoint's files at save and before every load.

A save records the digest of every file (megatron-core's ``integrity.json``, hashed by rank 0 alone after the
files are written); ``--load``, ``export-hf`` and ``granular-moe verify-checkpoint`` hash them again before
reading (:func:`granular_moe.training.checkpoint_integrity.verify_checkpoint`: the files split over threads in
the launcher, over the ranks in the job). Measured here, on a folder of ``--files`` random files of
``--file-mb`` MB each (read from the page cache after a first pass, so the figures are the hashing's, not the
disk's):

- ``sha256``: hashlib over a buffer in memory, one thread;
- ``save manifest``: megatron-core's ``save_integrity_manifest`` (what a save adds, on rank 0);
- ``verify, T threads``: ``verify_checkpoint`` with ``T`` threads (1 and this machine's cores).

Prints a table and writes ``checkpoint_checksums.json``::

    python benchmarks/bench_checkpoint_checksums.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from provenance import provenance


def best_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8, help="files in the checkpoint folder")
    parser.add_argument("--file-mb", type=int, default=64, help="size of each file (MB)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    from granular_moe.training.checkpoint_integrity import verify_checkpoint

    size = args.file_mb * 10**6
    total = args.files * size
    folder = Path(tempfile.mkdtemp(prefix="checksums-"))
    rows = []
    try:
        block = os.urandom(size)
        for index in range(args.files):
            (folder / f"__{index}_0.distcp").write_bytes(block[index:] + block[:index])
        seconds = best_seconds(lambda: hashlib.sha256(block).hexdigest(), args.repeats)
        rows.append({"what": "sha256 (memory, 1 thread)", "threads": 1, "bytes": size, "seconds": seconds})
        save_integrity_manifest(str(folder))  # a first pass: the files in the page cache
        seconds = best_seconds(lambda: save_integrity_manifest(str(folder)), args.repeats)
        rows.append({"what": "save manifest (megatron-core, rank 0)", "threads": 1, "bytes": total,
                     "seconds": seconds})
        for threads in sorted({1, os.cpu_count() or 1}):
            seconds = best_seconds(lambda threads=threads: verify_checkpoint(folder, threads=threads), args.repeats)
            rows.append({"what": f"verify, {threads} thread(s)", "threads": threads, "bytes": total,
                         "seconds": seconds})
    finally:
        shutil.rmtree(folder)
    for row in rows:
        row["mb_per_s"] = row["bytes"] / 1e6 / row["seconds"]
    print(f"{'':40} {'MB':>8} {'seconds':>8} {'MB/s':>8}")
    for row in rows:
        print(f"{row['what']:40} {row['bytes'] / 1e6:8.0f} {row['seconds']:8.3f} {row['mb_per_s']:8.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    info = {**provenance(), "files": args.files, "file_mb": args.file_mb, "repeats": args.repeats}
    (args.out / "checkpoint_checksums.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
