"""Files a run writes and later trusts: written atomically, checked when read, clear when the disk is full.

- `atomic_write(path, data)`: a temp file beside `path`, fsync, rename, fsync of the folder. A
  kill or a full disk leaves the old file or none, never half of one.
- `publish_directory(tmp, final)`: a folder written under a temp name (a checkpoint) is synced
  and renamed into place; an existing `final` is swapped out, never written over in place.
- `checksums(folder)` records sha256 and size of every file when it is written; `damaged_files`
  compares them on read (cut, flipped or missing files).
- `write_failed(path, err, ...)` turns an error while writing into one message that names the
  path and the free space; `check_free_space` says the same before a write starts.

Modes: files pairopt writes follow the umask. safetensors >= 0.8 writes through a temp file of
mode 0600 and renames it (safetensors#764, reported as #782), so `model.safetensors` alone came
out private; `publish_directory` and `publish_files` reset the mode of every file they move.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from pairopt.errors import PairoptError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def default_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0o666 & ~umask)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # Linux reports it without changing it; elsewhere reading it means setting it for a moment
    # (which another thread creating a file at that instant would see), then putting it back.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temp file + fsync + rename; on failure, nothing changes.

    Raises PairoptError (write_failed) when the disk is full or the path is not writable.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, err, need=len(raw)) from None


def sync_folder(folder: Path) -> None:
    """fsync a directory, so a rename inside it survives a power cut (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def sync_files(folder: Path) -> None:
    """fsync every file under `folder` and give it the umask's mode (see the module docstring)."""
    mode = default_mode()
    for file in _files_under(folder):
        os.chmod(file, mode)
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def publish_directory(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` to `final`, swapping out any folder already there.

    Two renames: `final` -> `final.old`, `tmp` -> `final`; then `final.old` is deleted. A kill
    between them leaves `final.old` complete (checkpoint.list_checkpoints reads it back), never
    a folder holding some old and some new files.
    """
    sync_files(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists() and final.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    sync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def publish_files(tmp: Path, folder: Path, *, last: tuple[str, ...]) -> None:
    """Move every entry of `tmp` into `folder`, the names in `last` last and in that order.

    A reader that takes `last[-1]` as the sign of a finished save never sees it before the rest.
    """
    sync_files(tmp)
    entries = sorted(tmp.iterdir(), key=lambda p: last.index(p.name) if p.name in last else -1)
    for entry in entries:
        if entry.is_dir():
            publish_directory(entry, folder / entry.name)
        else:
            os.replace(entry, folder / entry.name)
    sync_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """{path relative to `folder`: {"sha256", "bytes"}} for every file under it."""
    return {
        file.relative_to(folder).as_posix(): {
            "sha256": sha256_of(file),
            "bytes": file.stat().st_size,
        }
        for file in _files_under(folder)
    }


def damaged_files(folder: Path, recorded: dict[str, Any]) -> list[str]:
    """What differs from the `checksums(folder)` recorded at write time, one phrase per file."""
    problems = []
    for name, expected in sorted(recorded.items()):
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != expected["bytes"]:
            problems.append(
                f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written (cut short)"
            )
        elif sha256_of(file) != expected["sha256"]:
            problems.append(
                f"{name} does not match its checksum (bytes changed after it was written)"
            )
    return problems


def free_bytes(path: Path) -> int:
    """Free space on the filesystem of `path` (or of its nearest existing parent)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    return shutil.disk_usage(existing).free


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_free_space(path: Path, need: int, what: str, *, intact: str = "") -> None:
    """Refuse to start writing `what` (about `need` bytes) to `path` when the disk cannot hold it."""
    free = free_bytes(path)
    if free < need:
        raise PairoptError(
            f"not enough disk space to write {what} to {path}: about {human_bytes(need)} needed, "
            f"{human_bytes(free)} free on that filesystem. Free space there or choose another "
            f"--output-dir.{(' ' + intact) if intact else ''}"
        )


def is_disk_full(err: BaseException, path: Path, need: int) -> bool:
    """ENOSPC/EDQUOT; or an error without errno (torch.save's RuntimeError, safetensors'
    SafetensorError) that says so, or comes while the disk has less room than the write needed."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in _DISK_FULL
    said = any(text in str(err) for text in ("No space left on device", "Disk quota exceeded"))
    return said or free_bytes(path) < max(need, 1 << 20)


def write_failed(
    path: Path, err: BaseException, *, need: int = 0, intact: str = ""
) -> PairoptError:
    """One message for a failed write: the path, why (disk full: with the free space), what to do,
    and `intact`: what the failure left usable (a previous checkpoint, ...)."""
    tail = f" {intact}" if intact else ""
    if is_disk_full(err, path, need):
        return PairoptError(
            f"could not write {path}: the disk is full ({human_bytes(free_bytes(path))} free on "
            f"that filesystem{f', about {human_bytes(need)} needed' if need else ''}). Free space "
            f"there or choose another --output-dir.{tail}"
        )
    if isinstance(err, OSError) and err.errno in _READ_ONLY:
        return PairoptError(
            f"could not write {path}: {err.strerror or err}. Make it writable or choose another "
            f"--output-dir.{tail}"
        )
    return PairoptError(f"could not write {path}: {type(err).__name__}: {err}.{tail}")
