"""Output directories that never lose a user's files.

A command writes into a new or empty directory, or into one holding a previous
output of the same kind, which a small manifest (`.readmoe-output.json`: command,
version, the files it wrote) identifies. Anything else is refused unless the user
passes `--overwrite`, and even then only the files the command itself writes are
replaced: unknown files are never deleted (like `save_pretrained`, unlike a
`rm -rf` + rename). The new files are written into a temporary directory inside
the target first and moved into place one rename at a time once all of them
exist, so a command killed while writing leaves the previous output intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .atomic import atomic_write_json
from .errors import UserError

MANIFEST = ".readmoe-output.json"
_TMP_PREFIX = ".readmoe-tmp-"


def read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("kind"), str) else None


def claim(path: str | Path, kind: str, overwrite: bool = False) -> Path:
    """Check that `path` may receive a `kind` output; raise a UserError naming --overwrite if not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"`out` {path} exists and is not a directory; choose another `out`")
    if path.is_dir():
        entries = [p for p in path.iterdir() if p.name != MANIFEST and not p.name.startswith(_TMP_PREFIX)]
        m = read_manifest(path)
        if entries and not overwrite and (m is None or m["kind"] != kind):
            held = f"a readmoe '{m['kind']}' output" if m else "files readmoe did not write"
            raise UserError(f"`out` {path} holds {held}; choose a new or empty directory, or pass `overwrite=True` "
                            f"(it replaces only the files this command writes)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create `out` {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write to `out` {path}: permission denied")
    return path


def mark(path: Path, kind: str, files: list[str] | None = None) -> None:
    """Write the manifest that identifies `path` as a `kind` output."""
    from . import __version__

    atomic_write_json(Path(path) / MANIFEST, {"kind": kind, "version": __version__, "files": sorted(files or [])})


@contextlib.contextmanager
def output_dir(path: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success its entries replace their namesakes in `path`.

    Files of the previous `kind` output that this run no longer writes are removed (they are ours);
    every other file in `path` is left alone."""
    path = Path(path)
    created = not path.exists()
    claim(path, kind, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=path))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    old = read_manifest(path)
    stale = set(old["files"]) if old and old["kind"] == kind else set()
    new = sorted(p.name for p in tmp.iterdir())
    for name in new:
        dst = path / name
        if dst.is_dir() and not dst.is_symlink():
            away = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=path))
            os.replace(dst, away / name)
            os.replace(tmp / name, dst)
            shutil.rmtree(away, ignore_errors=True)
        else:
            os.replace(tmp / name, dst)
    for name in stale - set(new):
        p = path / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    tmp.rmdir()
    mark(path, kind, new)
