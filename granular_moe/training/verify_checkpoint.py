"""``granular-moe verify-checkpoint DIR``: check a checkpoint without loading it into a model.

``DIR`` is a ``--save`` folder (its newest checkpoint, as the tracker names it; ``--all``: every
``iter_NNNNNNN`` in it) or one ``iter_NNNNNNN`` folder. For each checkpoint:

1. its bytes: every file against the SHA-256 its save recorded in ``integrity.json``, no file missing and none
   added (:func:`granular_moe.training.checkpoint_integrity.verify_checkpoint`);
2. its pickles: ``.metadata`` and every non-tensor entry of its shards read as the job reads them
   (:mod:`granular_moe.training.trusted_reader`): torch's checkpoint metadata classes and plain data only;
3. its arguments: the iteration and the model flags it was saved with can be read.

Exit status 0 when every checkpoint passes, 1 when one does not (each problem named by file), 2 for a usage
error.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Sequence

from granular_moe.training.checkpoint import READ_ERRORS, CheckpointError, read_checkpoint, reading_error


def non_tensor_entries(directory: Path) -> int:
    """Read every non-tensor entry of the checkpoint through the trusted reader; returns how many there are."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from granular_moe.training.trusted_reader import TrustedFileSystemReader

    reader = TrustedFileSystemReader(directory)
    metadata = reader.read_metadata()
    entries = {key: io.BytesIO() for key, entry in metadata.state_dict_metadata.items()
               if isinstance(entry, BytesStorageMetadata)}
    try:
        load(entries, storage_reader=reader, no_dist=True)
    except READ_ERRORS as error:
        raise reading_error(error, f"{directory}: its non-tensor entries cannot be read") from None
    return len(entries)


def verify(directory: Path) -> str:
    """Check one checkpoint folder; returns a line saying what was checked."""
    from granular_moe.training.checkpoint_integrity import verify_checkpoint

    started = time.perf_counter()
    verified = verify_checkpoint(directory)
    seconds = time.perf_counter() - started
    entries = non_tensor_entries(directory)
    saved = read_checkpoint(directory)
    rate = verified.bytes / 1e6 / seconds if seconds > 0 else float("inf")
    return (f"{directory}: {verified.files} files, {verified.bytes / 1e6:,.1f} MB as their save recorded them "
            f"(SHA-256, {rate:,.0f} MB/s); .metadata and {entries} non-tensor entries hold only trusted types; "
            f"iteration {_iteration(directory)}, {saved.num_layers} layers, hidden {saved.hidden_size}")


def _iteration(directory: Path) -> str:
    name = directory.name.split(".")[0]
    return str(int(name[len("iter_"):])) if name.startswith("iter_") and name[len("iter_"):].isdigit() else "?"


def checkpoints(folder: Path, every: bool) -> list[Path]:
    """The checkpoint folders ``folder`` names: itself, the newest (the tracker's), or all of them."""
    from granular_moe.training.checkpoint import require_checkpoint

    if (folder / "metadata.json").is_file():
        return [folder]
    if every:
        found = sorted(path for path in folder.glob("iter_*") if path.is_dir() and path.name[5:].isdigit())
        if not found:
            raise CheckpointError(f"{folder}: no iter_NNNNNNN checkpoint folders")
        return found
    return [require_checkpoint(folder, "DIR")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granular-moe verify-checkpoint", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("directory", type=Path, metavar="DIR",
                        help="a --save folder (its newest checkpoint) or one iter_NNNNNNN folder")
    parser.add_argument("--all", action="store_true", help="every iter_NNNNNNN checkpoint of a --save folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    failed = False
    try:
        folders = checkpoints(args.directory, args.all)
    except CheckpointError as error:
        print(f"verify-checkpoint: error: {error}", file=sys.stderr, flush=True)
        return 1
    for directory in folders:
        try:
            print(f"verify-checkpoint: ok: {verify(directory)}", flush=True)
        except CheckpointError as error:
            print(f"verify-checkpoint: error: {error}", file=sys.stderr, flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
