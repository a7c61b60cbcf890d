"""Checked bytes and a trust boundary for checkpoints.

Bytes: every save records the SHA-256 of each file (integrity.json, megatron-core's manifest) before the tracker
names the checkpoint; the main job's --load (launcher and job), export-hf and `granular-moe verify-checkpoint`
check them before reading, and name the damaged file, once. Trust: reading a checkpoint unpickles nothing but
torch's checkpoint metadata classes and plain data: a pickle that runs a command, hidden in .metadata, in a
non-tensor entry of a shard (the RNG states, the common state) or in a common.pt, is refused by name and runs
nothing, in every reader (the main job's load, export-hf, verify-checkpoint, upcycling)."""

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from granular_moe.cli import main as cli
from granular_moe.training import checkpoint
from granular_moe.training.checkpoint import TRACKER, CheckpointError, TrainingState, load_checkpoint, save_checkpoint
from test_checkpoint import FLAGS, engine, trained, weights

# What the tests import from the modules they test is imported where used: the tests run, and fail by
# behaviour, on the code before these modules existed.
INTEGRITY_FILE = "integrity.json"


def verify_checkpoint(directory):
    from granular_moe.training.checkpoint_integrity import verify_checkpoint

    return verify_checkpoint(directory)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_scripts" / "pretrain_gpt_moe.sh"


class RunsACommand:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would hide."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def reseal(directory: Path) -> None:
    """Rewrite integrity.json over the folder's files, as whoever planted something would."""
    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    save_integrity_manifest(str(directory))


@pytest.fixture(scope="module")
def saved(gloo_world, tmp_path_factory):
    """A checkpoint of the tiny model (optimizer and RNG states included), and the model's weights."""
    args, built = trained()
    root = tmp_path_factory.mktemp("saved")
    save_checkpoint(root, TrainingState(2, 4), built, args)
    return root, weights(built)


@pytest.fixture
def copy(saved, tmp_path):
    """A copy of the saved checkpoint's --save folder; returns (folder, its iter_0000002)."""
    shutil.copytree(saved[0], tmp_path / "save")
    return tmp_path / "save", tmp_path / "save" / "iter_0000002"


def shard(directory: Path) -> Path:
    (found,) = directory.glob("*.distcp")
    return found


# --------------------------------------------------------------------------- checked bytes


def test_the_checksums_are_recorded_before_the_tracker_names_the_checkpoint(gloo_world, tmp_path, monkeypatch):
    args, built = trained()
    real_write = checkpoint._write_atomically

    def tracker_written(path, text):
        directory = tmp_path / f"iter_{int(text):07d}"
        listed = json.loads((directory / INTEGRITY_FILE).read_text())["files"]
        assert set(listed) == {p.name for p in directory.iterdir()} - {INTEGRITY_FILE}
        real_write(path, text)

    monkeypatch.setattr(checkpoint, "_write_atomically", tracker_written)
    directory = save_checkpoint(tmp_path, TrainingState(2, 4), built, args)
    from megatron.core.dist_checkpointing.validation import INTEGRITY_FNAME

    from granular_moe.training import checkpoint_integrity

    assert checkpoint_integrity.INTEGRITY_FILE == INTEGRITY_FILE == INTEGRITY_FNAME  # megatron-core's manifest
    assert (tmp_path / TRACKER).read_text() == "2"
    verified = verify_checkpoint(directory)
    assert verified.files == 3 and verified.bytes == sum(
        p.stat().st_size for p in directory.iterdir() if p.name != INTEGRITY_FILE)


def flip_4_kib(path: Path) -> None:
    """4 KiB of random bytes in the middle of a file, its size unchanged."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))


def test_random_bytes_inside_a_shard_are_named_by_file(copy):
    """4 KiB of random bytes inside a shard used to load silently (the wrong cause surfaced two steps later)."""
    save, directory = copy
    size = shard(directory).stat().st_size
    flip_4_kib(shard(directory))
    assert shard(directory).stat().st_size == size
    with pytest.raises(CheckpointError) as refused:
        verify_checkpoint(directory)
    assert str(refused.value) == (f"{shard(directory)} is damaged: its SHA-256 differs from the one integrity.json "
                                  "recorded at save")


def launch(argv, monkeypatch):
    from granular_moe.training import launch as launcher

    monkeypatch.setattr(launcher.os, "execvpe", lambda *a: pytest.fail("the launcher started the job"))
    return launcher.main(["torchrun", "--script", str(SCRIPT), "--nproc-per-node", "2", *argv],
                         {"PATH": os.environ["PATH"]})


@pytest.mark.parametrize("damage, named", [
    (flip_4_kib, "__0_0.distcp is damaged"),
    (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "__0_0.distcp is damaged"),
], ids=["random-bytes", "cut-in-half"])
def test_the_launcher_names_a_damaged_shard_once_before_starting_anything(copy, tmp_path, monkeypatch, capsys,
                                                                          damage, named):
    save, directory = copy
    damage(shard(directory))
    assert launch(FLAGS + ["--load", str(save), "--save", str(tmp_path / "run")], monkeypatch) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and f"{directory}/{named}" in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()  # nothing made for the refused job


def test_a_corrupted_metadata_is_named_by_the_launcher(copy, tmp_path, monkeypatch, capsys):
    save, directory = copy
    (directory / ".metadata").write_bytes(b"\x80\x04" + os.urandom(200))
    assert launch(FLAGS + ["--load", str(save), "--save", str(tmp_path / "run")], monkeypatch) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and f"{directory}/.metadata is damaged" in error


def job(rank, world_size, argv):
    from granular_moe.training.pretrain import main

    return main(argv)


def test_two_ranks_without_the_launcher_name_a_cut_shard_once(copy, tmp_path, capfd):
    """The ranks split the files to hash; the one that finds the damage tells the others, rank 0 prints."""
    save, directory = copy
    target = shard(directory)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert run_distributed(job, 2, FLAGS + ["--load", str(save), "--save", str(tmp_path / "run")]) == [2, 2]
    error = capfd.readouterr().err
    assert error.count("pretrain_gpt_moe: error:") == 1 and f"{target} is damaged" in error
    assert "Traceback" not in error and not (tmp_path / "run").exists()


def test_missing_unlisted_and_unrecorded_files_are_named(copy, gloo_world):
    save, directory = copy
    (directory / "common.pt").write_bytes(b"added later")
    with pytest.raises(CheckpointError, match=r"iter_0000002/common.pt is not one of the files the save wrote"):
        verify_checkpoint(directory)
    (directory / "common.pt").unlink()
    (directory / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"iter_0000002: .metadata is missing \(integrity.json lists it\)"):
        verify_checkpoint(directory)
    (directory / INTEGRITY_FILE).unlink()
    with pytest.raises(CheckpointError, match="no integrity.json.*pass --no-verify-integrity"):
        verify_checkpoint(directory)


class Started(Exception):
    """Raised in place of the launcher's exec: the job would have started."""


def test_the_main_job_checks_its_load_unless_told_not_to(copy, tmp_path, capsys, monkeypatch):
    """A checkpoint without checksums is refused by name, by the job (in-process, one rank) and the launcher;
    with --no-verify-integrity the launcher starts the job, having checked nothing."""
    from granular_moe.training import launch as launcher
    from granular_moe.training.pretrain import main

    VERIFIED_ENV = "GRANULAR_MOE_VERIFIED_CHECKPOINTS"

    save, directory = copy
    (directory / INTEGRITY_FILE).unlink()
    flags = FLAGS + ["--load", str(save), "--save", str(tmp_path / "run")]
    assert main(flags) == 2
    assert f"{directory}: no integrity.json" in capsys.readouterr().err
    assert launch(flags, monkeypatch) == 2
    assert f"{directory}: no integrity.json" in capsys.readouterr().err
    handed = {}

    def started(file, command, environ):
        handed.update(environ)
        raise Started

    monkeypatch.setattr(launcher.os, "execvpe", started)
    with pytest.raises(Started):
        launcher.main(["torchrun", "--script", str(SCRIPT), "--nproc-per-node", "2", *flags,
                       "--no-verify-integrity"], {"PATH": os.environ["PATH"]})
    assert handed.get(VERIFIED_ENV, "{}") == "{}"


def test_verify_checkpoint_checks_bytes_and_pickles(copy, capsys):
    save, directory = copy
    assert cli(["verify-checkpoint", str(save)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verify-checkpoint: ok: {directory}: 3 files") and "6 non-tensor entries" in out
    flip_4_kib(shard(directory))
    assert cli(["verify-checkpoint", str(save), "--all"]) == 1
    assert f"{shard(directory)} is damaged" in capsys.readouterr().err


def test_export_hf_names_a_damaged_file_before_reading(copy, tmp_path):
    from granular_moe.hf.export import export_hf

    save, directory = copy
    flip_4_kib(shard(directory))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp is damaged: its SHA-256 differs"):
        export_hf(save, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- the trust boundary


@pytest.fixture(scope="module")
def untrusted(gloo_world, tmp_path_factory):
    """Checkpoints, each with a command-running pickle hidden in one place (integrity.json rewritten to match),
    and the marker file the command would create."""
    root = tmp_path_factory.mktemp("untrusted")
    marker = root / "the-command-ran"
    args, built = trained()
    folders = {}

    for place in ("metadata", "rng", "common-state", "common.pt"):
        save = root / place
        if place == "rng":
            real = checkpoint._rng_state

            def rng_with_payload(real=real):
                state = real()
                state.data[0]["payload"] = RunsACommand(marker)
                return state

            checkpoint._rng_state = rng_with_payload
            try:
                directory = save_checkpoint(save, TrainingState(2, 4), built, args)
            finally:
                checkpoint._rng_state = real
        elif place == "common-state":
            carrying = type(args)(**vars(args))
            carrying.payload = RunsACommand(marker)
            directory = save_checkpoint(save, TrainingState(2, 4), built, carrying)
        else:
            directory = save_checkpoint(save, TrainingState(2, 4), built, args)
        if place == "metadata":
            (directory / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
        if place == "common.pt":
            torch.save({"args": RunsACommand(marker)}, directory / "common.pt")
        reseal(directory)
        folders[place] = save
    assert not marker.exists()  # saving pickles; only reading would run it
    return folders, marker


def read_by_main_job(save, tmp_path):
    fresh_args, fresh = engine(seed=1)
    load_checkpoint(save / "iter_0000002", fresh, fresh_args)


def read_by_export_hf(save, tmp_path):
    from granular_moe.hf.export import export_hf

    export_hf(save, tmp_path / "hf")


def read_by_verify_checkpoint(save, tmp_path):
    from granular_moe.training.verify_checkpoint import verify

    verify(save / "iter_0000002")


def read_by_upcycling(save, tmp_path):
    from test_upcycle import DENSE, job_args, moe_flags, relu_config

    from granular_moe.training.upcycle import upcycled_chunks

    args = job_args(DENSE + moe_flags(4, 1, 2, upcycle_from=save))
    upcycled_chunks(args, relu_config(args), 256)


REFUSALS = {
    "metadata": r"iter_0000002/\.metadata: refusing to unpickle posix\.system",
    "rng": r"iter_0000002/__0_0\.distcp: refusing to unpickle posix\.system in its entry 'rng_state/",
    "common-state": r"iter_0000002/__0_0\.distcp: refusing to unpickle posix\.system in its entry 'common_state/",
    "common.pt": r"iter_0000002/common\.pt: refusing to unpickle posix\.system",
}
READERS = {"main-job": read_by_main_job, "export-hf": read_by_export_hf, "verify-checkpoint": read_by_verify_checkpoint,
           "upcycle": read_by_upcycling}
# export-hf and upcycling read the weights and the arguments only, never the RNG states
CASES = [(place, reader) for place in REFUSALS for reader in READERS
         if not (place == "rng" and reader in ("export-hf", "upcycle"))]


@pytest.mark.parametrize("place, reader", CASES, ids=[f"{place}-{reader}" for place, reader in CASES])
def test_a_command_running_pickle_is_refused_by_name_and_runs_nothing(untrusted, tmp_path, place, reader):
    folders, marker = untrusted
    marker.unlink(missing_ok=True)
    try:
        READERS[reader](folders[place], tmp_path)
        raised = None
    except Exception as error:
        raised = error
    assert not marker.exists(), "reading the checkpoint ran the pickle's command"
    from granular_moe.training.trusted_reader import UntrustedCheckpointError

    assert isinstance(raised, UntrustedCheckpointError) and re.search(REFUSALS[place], str(raised)), raised


def test_the_checksum_benchmark_measures_save_and_load(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    bench = ROOT / "benchmarks" / "bench_checkpoint_checksums.py"
    monkeypatch.setattr(sys, "argv", [str(bench), "--files", "2", "--file-mb", "1", "--repeats", "1",
                                      "--out", str(tmp_path)])
    monkeypatch.syspath_prepend(str(bench.parent))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(bench), run_name="__main__")
    assert done.value.code == 0
    rows = json.loads((tmp_path / "checkpoint_checksums.json").read_text())["rows"]
    assert [row["what"] for row in rows][:2] == ["sha256 (memory, 1 thread)", "save manifest (megatron-core, rank 0)"]
    assert all(row["mb_per_s"] > 0 and row["bytes"] in (10**6, 2 * 10**6) for row in rows)


def test_the_manifest_written_from_the_writers_digests_is_megatron_cores(copy):
    """granular-moe import-hf's workers hash the files they write; the manifest made from their digests is the one
    megatron-core's save_integrity_manifest writes over the same files, byte for byte."""
    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    from granular_moe.training.checkpoint_integrity import CheckpointError, file_digest, write_manifest

    _, directory = copy
    save_integrity_manifest(str(directory))
    expected = (directory / INTEGRITY_FILE).read_bytes()
    distcp = {path.name: file_digest(path) for path in directory.glob("*.distcp")}
    assert distcp
    for known in ({}, distcp):
        (directory / INTEGRITY_FILE).unlink()
        write_manifest(directory, known, threads=2)
        assert (directory / INTEGRITY_FILE).read_bytes() == expected
    with pytest.raises(CheckpointError, match=r"digests given for files it does not hold: \['gone.distcp'\]"):
        write_manifest(directory, {**distcp, "gone.distcp": "0" * 64})


@pytest.mark.parametrize("entries", ["every", "last"])
def test_a_metadata_naming_a_file_outside_the_checkpoint_is_refused(copy, gloo_world, entries):
    """Shards are read only inside the checkpoint's folder: an index pointing at ../ is refused, whether every
    entry or one among many (after others naming the real shard) does."""
    save, directory = copy
    metadata = pickle.loads((directory / ".metadata").read_bytes())  # the test's own, trusted
    infos = list(metadata.storage_data.values())
    for info in infos if entries == "every" else infos[-1:]:
        info.relative_path = "../../outside.distcp"
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    fresh_args, fresh = engine(seed=1)
    with pytest.raises(CheckpointError, match=r"\.metadata: names '\.\./\.\./outside\.distcp' as a shard"):
        load_checkpoint(directory, fresh, fresh_args)
