"""File-system helpers: atomic folder output (locked, with temp folders of dead processes
cleaned up), and content hashes for manifests."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from resrank_export.errors import DiskSpaceError, OutputInUseError, ResRankExportError
from resrank_export.interrupt import INTERRUPTIONS

log = logging.getLogger(__name__)
OWNER_FILE = ".resrank-owner.json"  # inside a temp folder: who writes it (removed before the rename)


@contextlib.contextmanager
def atomic_dir(target: Path, seed_from: Path | None = None, keep_on_interrupt: Path | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on failure it is
    removed, so a reader never sees a half-written folder. With `seed_from` the temp folder
    starts as a hard-linked copy of that folder (stages that are skipped keep their files
    without copying bytes). With `keep_on_interrupt`, an interruption (SIGTERM, Ctrl-C) moves
    the temp folder there instead of removing it (unless empty): the caller left only
    resumable work in it. The output is locked while the temp folder exists, and temp folders
    of dead processes (SIGKILL, OOM) for the same target are removed first."""
    target = Path(target).absolute()  # stages join paths under the yielded folder; keep it absolute
    with output_lock(target):  # creates the parent folder
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        owner = {**_this_process(), "target": str(target)}
        (tmp / OWNER_FILE).write_text(json.dumps(owner) + "\n")
        try:
            if seed_from is not None and Path(seed_from).is_dir():
                shutil.copytree(seed_from, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
            yield tmp
        except INTERRUPTIONS:
            if keep_on_interrupt is None or not any(p.name != OWNER_FILE for p in tmp.iterdir()):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            (tmp / OWNER_FILE).unlink(missing_ok=True)
            shutil.rmtree(keep_on_interrupt, ignore_errors=True)
            tmp.rename(keep_on_interrupt)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / OWNER_FILE).unlink()
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --- who owns a temp folder or an output, and whether that process still runs ------------------

def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), so a pid reused by
    another process after a crash is not taken for the owner; None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid())}


def owner_alive(owner: dict) -> bool | None:
    """True/False for a process of this host; None for another host's (cannot be checked)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    start = owner.get("process_start")
    return start is None or _process_start(pid) in (None, start)


def read_owner(folder: Path) -> dict | None:
    try:
        owner = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) and "pid" in owner and "host" in owner else None


def _temps_of(target: Path) -> list[tuple[Path, dict | None]]:
    """(temp folder, owner record or None) of every temp folder named after `target`."""
    target = Path(target).absolute()
    found = []
    for folder in sorted(target.parent.glob(f".{glob.escape(target.name)}.*.tmp")):
        if folder.is_dir():
            owner = read_owner(folder)
            if owner is None or owner.get("target") == str(target):  # not another output's of a similar name
                found.append((folder, owner))
    return found


def stale_temps(target: Path) -> list[Path]:
    """Temp folders of `target` whose owner process is gone (this host only)."""
    return [folder for folder, owner in _temps_of(target) if owner is not None and owner_alive(owner) is False]


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temp folders of dead processes for `target`, one log line each; report those
    without an owner record, which cannot be told from a live older version's."""
    removed = []
    for folder, owner in _temps_of(target):
        if owner is None:
            log.warning("%s: left alone, it has no owner record (an older resrank-export's?), %s; remove it "
                        "by hand if no build is writing it", folder, format_bytes(tree_bytes(folder)))
        elif owner_alive(owner) is False:
            size = tree_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("removed %s, %s, left by process %s on %s that is gone (killed or out of memory)",
                        folder, format_bytes(size), owner.get("pid"), owner.get("host"))
            removed.append(folder)
    return removed


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (hard links to files outside included)."""
    return sum(p.lstat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def format_bytes(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"


# --- one writer per output ----------------------------------------------------------------------

_held_locks: dict[Path, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within a process


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `target` (flock: released by the kernel if the process dies,
    so a killed build never blocks the next one). A second process is refused at once."""
    target = Path(target).absolute()
    path = target.with_name(f".{target.name}.lock")
    if path in _held_locks:
        fd, depth = _held_locks[path]
        _held_locks[path] = (fd, depth + 1)
        try:
            yield
        finally:
            _held_locks[path] = (fd, _held_locks[path][1] - 1)
        return
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    try:  # the first write of every output: a path that cannot be written fails here, before any work
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, target)
    except OSError as exc:
        _remove_empty(created)
        raise ResRankExportError(f"{target}: cannot write there ({exc.strerror or exc}: "
                                 f"{exc.filename or target.parent})") from None
    _held_locks[path] = (fd, 1)
    try:
        yield
    finally:
        del _held_locks[path]
        path.unlink(missing_ok=True)  # while still locked: a waiter then sees a new inode and retries
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """A run that wrote nothing leaves no empty parents behind (deepest first)."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _acquire(path: Path, target: Path) -> int:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise OutputInUseError(f"{target}: another resrank-export process (pid {holder.get('pid', '?')} on "
                                   f"{holder.get('host', '?')}) is writing it; wait for it or choose another --out")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder unlinked after we opened it
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_this_process()).encode())
            return fd
        os.close(fd)


def _read_fd(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, json.JSONDecodeError):
        return {}


FREE_BYTES_ENV = "RESRANK_EXPORT_FREE_BYTES"  # tests: pretend the file system has this much free space


def free_bytes(folder: Path) -> int:
    """Free space of the file system holding `folder` (the nearest existing parent)."""
    override = os.environ.get(FREE_BYTES_ENV)
    if override:
        return int(override)
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def require_free_space(folder: Path, needed: dict[str, int], what: str) -> None:
    """Refuse before writing when `folder`'s file system has less free space than the sum of
    `needed` (item -> bytes), naming both figures and the items."""
    total, free = sum(needed.values()), free_bytes(folder)
    if total > free:
        items = ", ".join(f"{name} {format_bytes(size)}" for name, size in needed.items())
        raise DiskSpaceError(f"{folder}: {what} needs about {total:,} bytes ({format_bytes(total)}: {items}) but the "
                             f"file system has {free:,} bytes ({format_bytes(free)}) free; free space or choose "
                             f"another --out")


def link_or_copy(src: str, dst: str) -> None:
    """Hard link when the file system allows it (graphs can be GBs), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """One hash over every file's relative path and content, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def refuse_foreign_folder(out: Path, marker: str, kind: str) -> None:
    """Never replace a folder this tool did not write (no `marker` inside): that would lose the
    user's files. An empty folder or a missing one is fine."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise ResRankExportError(f"{out}: exists and is not {kind} (no {marker}); choose another --out or remove it")
