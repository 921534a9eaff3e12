"""File-system helpers: atomic folder output and content hashes for manifests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from resrank_export.errors import ResRankExportError


@contextlib.contextmanager
def atomic_dir(target: Path, seed_from_target: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on failure it is
    removed, so a reader never sees a half-written folder. With `seed_from_target` the temp
    folder starts as a hard-linked copy of the existing target (stages that are skipped keep
    their files without copying bytes)."""
    target = Path(target).absolute()  # stages join paths under the yielded folder; keep it absolute
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if seed_from_target and target.is_dir():
            shutil.rmtree(tmp)
            shutil.copytree(target, tmp, copy_function=link_or_copy)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
