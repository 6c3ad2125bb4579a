"""Files that are never half written, and one writer per folder.

- ``atomic_write(path, write)`` / ``atomic_path(path)``: write into a temp file in the same
  folder, fsync, rename over ``path``. A kill leaves the old file or the new one, never a mix; a full disk raises
  ``DiskFullError`` naming the file and the free space, and the old file stays as it was.
- ``FolderLock(folder)``: an exclusive ``flock`` on ``<folder>/.dinoflow.lock`` holding the
  owner's pid and command. A second process gets ``LockedError`` naming the holder; the kernel
  drops the lock when its process dies, so a stale lock file is simply taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dinoflow.errors import DiskFullError, LockedError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# torch.save reports a failed write of its zip writer as this, without the errno
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "No space left")


def free_bytes(folder: str | os.PathLike[str]) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def _human(n: int) -> str:
    if n < 0:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
    text = str(exc)
    return any(s in text for s in _TORCH_SHORT_WRITE) and free_bytes(folder) < 64 * 2**20


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp file's path beside ``path`` to write (by any means: a file object, a memory map);
    on leaving the block it is fsynced and renamed over ``path``, or removed if the block
    raised (a full disk: ``DiskFullError`` naming the file; the old one stays as it was). A
    reader of the old file keeps its (unlinked) copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _is_disk_full(exc, path.parent):
            kept = (
                f"the previous {path.name} is intact" if path.exists() else "nothing was replaced"
            )
            raise DiskFullError(
                f"disk full while writing {path} ({_human(free_bytes(path.parent))} free on "
                f"{path.parent}); {kept}. Free some space and run again."
            ) from exc
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """``write(f)`` into a temp file beside ``path``, fsync, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def prune(folder: str | os.PathLike[str], keep: set[Path]) -> None:
    """Delete the files of ``folder`` not in ``keep`` (stale results, temp files of a killed
    write)."""
    for path in Path(folder).iterdir():
        if path.is_file() and path not in keep:
            path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------- locks
def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """``with FolderLock(folder, "pretrain"):`` one writer at a time in ``folder``.

    Raises ``LockedError`` naming the process that holds it. Re-entrant in one process (a
    nested job in the same process, e.g. a tuning trial inside ``kedro run``, passes).
    """

    _held: dict[str, int] = {}  # lock path -> depth, for this process

    def __init__(self, folder: str | os.PathLike[str], what: str, name: str = ".dinoflow.lock"):
        self.path = Path(folder) / name
        self.what = what
        self._fd: int | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def __enter__(self) -> FolderLock:
        key = str(self.path.resolve())
        if FolderLock._held.get(key):
            FolderLock._held[key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder() or {}
            raise LockedError(
                f"{self.path.parent} is in use by process {h.get('pid', '?')} on "
                f"{h.get('host', '?')} ({h.get('what', '?')}: {h.get('command', '?')}, since "
                f"{h.get('since', '?')}); wait for it to finish or stop it first"
            ) from None
        previous = self.holder()
        if previous and previous.get("pid") and not pid_alive(int(previous["pid"])):
            import logging

            logging.getLogger(__name__).warning(
                "taking over the lock of %s left by process %s (%s), which is gone",
                self.path.parent,
                previous.get("pid"),
                previous.get("what"),
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": self.what,
            "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        FolderLock._held[key] = 1
        return self

    def __exit__(self, *exc: object) -> None:
        key = str(self.path.resolve())
        FolderLock._held[key] -= 1
        if FolderLock._held[key] or self._fd is None:
            return
        del FolderLock._held[key]
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------- folder swaps
_JOURNAL = ".swap.json"


def swap_in(
    staging: str | os.PathLike[str],
    target: str | os.PathLike[str],
    files: dict[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Replace the folder ``target`` with the complete folder ``staging``, and with it the files
    ``files`` ({name inside staging: destination}), as one change.

    Renaming ``staging`` to ``<target>.commit`` is the commit point: before it nothing of the old
    state was touched; after it the swap is rolled forward, by this call or, after a kill, by
    ``recover_swaps`` (the next load or save of the set). Readers see the old set or the new set.
    """
    staging, target = Path(staging), Path(target)
    journal = {
        "target": str(target.absolute()),
        "files": {name: str(Path(dest).absolute()) for name, dest in (files or {}).items()},
    }
    atomic_write_json(staging / _JOURNAL, journal)
    commit = target.with_name(target.name + ".commit")
    if commit.exists():  # an older committed swap not rolled forward yet: finish it first
        _roll_forward(commit)
    os.replace(staging, commit)
    _roll_forward(commit)
    return target


def _roll_forward(commit: Path) -> None:
    journal = json.loads((commit / _JOURNAL).read_text())
    target = Path(journal["target"])
    for name, dest in journal["files"].items():
        atomic_write_bytes(dest, (commit / name).read_bytes())
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(commit, target)
    (target / _JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def staging_folder(target: str | os.PathLike[str]) -> Path:
    """A fresh ``<target>.staging-<pid>`` beside ``target`` (removed by ``recover_swaps`` once
    its process is gone)."""
    target = Path(target)
    staging = target.with_name(f"{target.name}.staging-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def recover_swaps(folder: str | os.PathLike[str]) -> list[str]:
    """Finish committed swaps under ``folder`` and remove staging folders of dead processes."""
    folder, done = Path(folder), []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        if path.is_dir() and path.name.endswith(".commit") and (path / _JOURNAL).is_file():
            _roll_forward(path)
            done.append(f"finished the interrupted swap of {path.name.removesuffix('.commit')}")
        elif path.is_dir() and ".staging-" in path.name:
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed the unfinished {path.name}")
    if done:
        import logging

        logging.getLogger(__name__).warning("%s: %s", folder, "; ".join(done))
    return done
