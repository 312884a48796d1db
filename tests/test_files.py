"""pairopt.training.files: atomic writes, folder swaps, checksums and the disk-full message,
with the faults injected at the system calls (os.replace failing, ENOSPC, EACCES)."""

from __future__ import annotations

import collections
import errno
import os
from pathlib import Path

import pytest

from pairopt.errors import PairoptError
from pairopt.training import files


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_replaces_or_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "trainer_state.json"
    files.atomic_write(path, '{"step": 2}')
    assert path.read_text() == '{"step": 2}'
    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(PairoptError) as err:
        files.atomic_write(path, '{"step": 4}')
    assert path.read_text() == '{"step": 2}'  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json"]  # no temp left
    message = str(err.value)
    assert f"could not write {path}: the disk is full (" in message
    assert "free on that filesystem, about 11 bytes needed" in message  # len('{"step": 4}')


def test_an_unwritable_path_is_named_with_what_to_do(tmp_path: Path, monkeypatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.os, "replace", denied)
    with pytest.raises(PairoptError, match=r"could not write .*x.txt: Permission denied. Make it"):
        files.atomic_write(tmp_path / "x.txt", "x")


def test_an_error_without_errno_is_disk_full_only_when_the_disk_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save reports a full disk as RuntimeError without errno; the free space decides."""
    failed = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert "the disk is full" not in str(files.write_failed(tmp_path, failed, need=10))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(100, 100, 0))
    message = str(files.write_failed(tmp_path, failed, need=3 * 1024**2, intact="Step 2 is kept."))
    assert message == (
        f"could not write {tmp_path}: the disk is full (0 bytes free on that filesystem, about "
        "3.0 MiB needed). Free space there or choose another --output-dir. Step 2 is kept."
    )


def make_folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(content)
    (path / "sub").mkdir()
    (path / "sub" / "optimizer.bin").write_text(content * 2)
    return path


def test_publish_directory_swaps_and_a_kill_between_the_renames_keeps_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = make_folder(tmp_path / "step-000004", "old")
    files.publish_directory(make_folder(tmp_path / "step-000004.tmp", "new"), final)
    assert (final / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]
    calls = []
    real = os.replace

    def killed_second(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(files.os, "replace", killed_second)
    with pytest.raises(KeyboardInterrupt):
        files.publish_directory(make_folder(tmp_path / "step-000004.tmp", "newer"), final)
    assert not final.exists()
    assert (tmp_path / "step-000004.old" / "model.safetensors").read_text() == "new"


def test_checksums_find_cut_flipped_and_missing_files(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "c", "weights")
    recorded = files.checksums(folder)
    assert sorted(recorded) == ["model.safetensors", "sub/optimizer.bin"]
    assert recorded["model.safetensors"]["bytes"] == 7
    assert files.damaged_files(folder, recorded) == []
    (folder / "model.safetensors").write_text("weighs")  # cut by one byte
    (folder / "sub" / "optimizer.bin").write_text("weightsweightZ")  # same size, one byte off
    assert files.damaged_files(folder, recorded) == [
        "model.safetensors has 6 bytes, 7 were written (cut short)",
        "sub/optimizer.bin does not match its checksum (bytes changed after it was written)",
    ]
    (folder / "model.safetensors").unlink()
    assert files.damaged_files(folder, recorded)[0] == "model.safetensors is missing"


def test_published_files_get_the_umask_mode(tmp_path: Path) -> None:
    """safetensors >= 0.8 leaves its files at 0600; publishing gives them 0o666 & ~umask."""
    previous = os.umask(0o027)
    try:
        tmp = make_folder(tmp_path / "t", "x")
        os.chmod(tmp / "model.safetensors", 0o600)
        files.publish_directory(tmp, tmp_path / "final")
    finally:
        os.umask(previous)
    assert (tmp_path / "final" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert files.human_bytes(1536) == "1.5 KiB" and files.human_bytes(12) == "12 bytes"
