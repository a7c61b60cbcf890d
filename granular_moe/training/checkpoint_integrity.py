"""Checked bytes: every file of a checkpoint against the SHA-256 digests its save recorded.

Saves ask megatron-core for its integrity manifest (``dist_checkpointing.save(..., verify_integrity=True)``):
``integrity.json``, ``{"algorithm": "sha256", "files": {name: digest}}`` over every file of the checkpoint,
written by rank 0 once every rank's files are complete, before the checkpoint is renamed into place and the
tracker names it. :func:`verify_checkpoint` checks a checkpoint against it before anything reads it: every
listed file present, no file it does not list (a ``common.pt`` or shard slipped in later), every digest equal.
The work splits over files (threads here, ranks in the job: ``share``); what is wrong is named by file, every
such file in one message.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from granular_moe.training.checkpoint import CheckpointError, find_checkpoint

INTEGRITY_FILE = "integrity.json"  # megatron-core's name (dist_checkpointing.validation.INTEGRITY_FNAME)
ALGORITHM = "sha256"
SKIP_FLAG = "--no-verify-integrity"
# Checkpoints the launcher verified before starting the processes: {folder: SHA-256 of its integrity.json}.
VERIFIED_ENV = "GRANULAR_MOE_VERIFIED_CHECKPOINTS"


@dataclass(frozen=True)
class Verified:
    """What a verification read: files and bytes (this share's)."""

    files: int
    bytes: int


def file_digest(path: Path) -> str:
    """The SHA-256 of a file (hashlib releases the GIL while it hashes: threads hash files in parallel)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, ALGORITHM).hexdigest()


def _files(directory: Path) -> list[str]:
    """The names of the checkpoint's files a manifest covers (every file but the manifest), sorted."""
    return sorted(entry.name for entry in directory.iterdir() if entry.is_file() and entry.name != INTEGRITY_FILE)


def _digests(directory: Path, names: list[str], threads: Optional[int]) -> list[str]:
    """The SHA-256 of each of ``names`` in ``directory``, on ``threads`` threads (default: the cores, at most 8)."""
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names) or 1))) as pool:
        return list(pool.map(lambda name: file_digest(directory / name), names))


def read_manifest(directory: Path) -> dict[str, str]:
    """The digests ``integrity.json`` lists, by file name; an error naming it when it is missing or damaged."""
    path = Path(directory) / INTEGRITY_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no {INTEGRITY_FILE}, the SHA-256 digests its save records (a checkpoint written before "
            f"checksums, or by another writer); its bytes cannot be checked: pass {SKIP_FLAG} to load it unchecked")
    try:
        manifest = json.loads(path.read_text())
        algorithm, files = manifest.get("algorithm", ALGORITHM), manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("'files' is not a {name: digest} mapping")
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error})") from None
    if algorithm != ALGORITHM:
        raise CheckpointError(f"{path}: digests of {algorithm!r}; this job checks {ALGORITHM}")
    for name in files:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path} lists {name!r}; a checkpoint's files are inside its folder")
    return files


def write_manifest(directory: Path, known: Optional[dict[str, str]] = None, threads: Optional[int] = None) -> None:
    """megatron-core's ``save_integrity_manifest``, the same bytes: ``integrity.json`` over every other file of
    ``directory``, sorted by name. ``known`` holds the digests of files their writers already hashed (while the
    bytes were in their page cache, in parallel); the other files are hashed here, on ``threads`` threads."""
    directory = Path(directory)
    known = known or {}
    names = _files(directory)
    strangers = sorted(set(known) - set(names))
    if strangers:
        raise CheckpointError(f"{directory}: digests given for files it does not hold: {strangers}")
    missing = [name for name in names if name not in known]
    hashed = dict(zip(missing, _digests(directory, missing, threads)))
    with open(directory / INTEGRITY_FILE, "w") as handle:
        json.dump({"algorithm": ALGORITHM, "files": {name: known.get(name) or hashed[name] for name in names}},
                  handle, indent=2)


def manifest_digest(directory: Path) -> str:
    """The SHA-256 of the checkpoint's ``integrity.json`` (which names the digest of every other file)."""
    return file_digest(Path(directory) / INTEGRITY_FILE)


def verify_checkpoint(directory: Path, share: tuple[int, int] = (0, 1), threads: Optional[int] = None) -> Verified:
    """Check the files of the checkpoint in ``directory`` against its ``integrity.json``: the share
    ``(index, count)`` of the listed files this caller hashes (all of them by default; ranks split them), on
    ``threads`` threads. Every caller checks that the folder holds exactly the listed files. Raises
    :class:`~granular_moe.training.checkpoint.CheckpointError` naming each damaged, missing or unlisted file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    present = set(_files(directory))
    problems = [f"{directory}: {name} is missing ({INTEGRITY_FILE} lists it)"
                for name in sorted(set(manifest) - present)]
    problems += [f"{directory / name} is not one of the files the save wrote ({INTEGRITY_FILE} does not list it)"
                 for name in sorted(present - set(manifest))]
    if problems:
        raise CheckpointError("\n".join(problems))
    index, count = share
    mine = sorted(manifest)[index::count]
    damaged = [name for name, digest in zip(mine, _digests(directory, mine, threads)) if digest != manifest[name]]
    if damaged:
        raise CheckpointError("\n".join(
            f"{directory / name} is damaged: its SHA-256 differs from the one {INTEGRITY_FILE} recorded at save"
            for name in damaged))
    return Verified(len(mine), sum((directory / name).stat().st_size for name in mine))


def job_checkpoints(args) -> list[Path]:
    """The checkpoint a main job with these flags reads: ``--load``'s newest, or, when there is none,
    ``--moe-upcycle-from``'s (the job upcycles only when it does not resume)."""
    for folder in (args.load, getattr(args, "moe_upcycle_from", None)):
        directory = find_checkpoint(folder) if folder is not None else None
        if directory is not None:
            return [directory]
    return []


def verified_by_launcher(environ) -> dict[str, str]:
    """The checkpoints the launcher verified for this job (:data:`VERIFIED_ENV`)."""
    text = environ.get(VERIFIED_ENV)
    try:
        return dict(json.loads(text)) if text else {}
    except (ValueError, TypeError):
        return {}


def needs_verifying(directory: Path, environ) -> bool:
    """Whether this job must still verify ``directory``: the launcher did not, or the checkpoint changed since
    (its ``integrity.json`` differs)."""
    digest = verified_by_launcher(environ).get(str(Path(directory).resolve()))
    return digest is None or not (Path(directory) / INTEGRITY_FILE).is_file() or digest != manifest_digest(directory)


def verified_env(directories: Sequence[Path]) -> dict[str, str]:
    """The environment that tells the job's processes these checkpoints were verified (as they are now)."""
    return {VERIFIED_ENV: json.dumps({str(Path(d).resolve()): manifest_digest(d) for d in directories})}
