"""The index folder's layout (docs/index.md) and the check that a folder holds a complete index."""

from __future__ import annotations

import json
from pathlib import Path

from resrank_export.errors import IndexFormatError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
FAISS_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.json"
TEXTS_FILE = "texts.jsonl"
IVF_LISTS_FILE = "index.ivfdata"  # on-disk inverted lists (params.on_disk_lists), memory-mapped


def read_index_info(folder: Path) -> dict:
    """index.json of a complete index, or IndexFormatError saying what is wrong."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        partial = folder.parent / f".{folder.name}.partial"
        hint = (f"; {partial} holds an interrupted build: rerun the index build to resume it"
                if partial.is_dir() else "")
        raise IndexFormatError(f"{path}: not found, {folder} is not a complete index{hint}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION or info.get("complete") is not True:
        raise IndexFormatError(f"{path}: expected format_version {FORMAT_VERSION} and complete true")
    names = (FAISS_FILE, VECTORS_FILE, IDS_FILE) + ((TEXTS_FILE,) if info.get("has_texts") else ())
    if isinstance(info.get("params"), dict) and info["params"].get("on_disk_lists"):
        names += (IVF_LISTS_FILE,)
    for name in names:
        if not (folder / name).is_file():
            raise IndexFormatError(f"{folder / name}: file not found; the index is incomplete")
    return info
