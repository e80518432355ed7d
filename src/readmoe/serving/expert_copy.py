"""The routed experts of a checkpoint in the serving dtype, on disk, for a disk expert store to read.

A trained carve is saved in fp32 and served in bf16. Read from the checkpoint itself, every load reads twice the
bytes it serves and casts them with stochastic rounding (rounding.py): of a demo expert's ~0.9 ms load, 0.33 ms
reading and 0.38 ms casting, paid again at every reload. The copy is cast once, by the same function with the same
tensor names (so it holds the very bits a load from the checkpoint would make), and kept in `$READMOE_EXPERT_COPIES`
or else `expert-copies` in the user cache (`$READMOE_CACHE`, default `~/.cache/readmoe`), under a key of the
checkpoint's path and its files' sizes and modification times: a changed checkpoint gets a new copy, which replaces
the old one, and every engine after the first reuses it. It is written shard by shard (one shard in memory at a
time) into a temporary directory renamed into place, so a killed build leaves nothing that looks whole. Each copy
names its checkpoint in a `SOURCE` file, so the copy of a checkpoint since deleted is removed the next time any
engine resolves its own copy (a 7B carve's copy is 13 GB: a cache should not outlive what it caches).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import INDEX, Checkpoint, ShardWriter, is_checkpoint
from ..errors import UserError
from ..rounding import cast
from .packed_linear import PackMode

FORMAT = 2  # bump when the copy's layout or the rounding changes: older copies are then never read (2: SOURCE)
AUTO_DISK_FRACTION = 0.5  # auto builds the copy when it takes at most this share of the cache's free disk space
SOURCE = "SOURCE"  # in each copy: the checkpoint directory it copies


def copies_root() -> Path:
    """`$READMOE_EXPERT_COPIES` (say, a faster disk than the cache's), else `expert-copies` in the user cache."""
    from ..assets import cache_dir

    where = os.environ.get("READMOE_EXPERT_COPIES")
    return Path(where).expanduser() if where else cache_dir() / "expert-copies"


def _h(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _stem(d: Path, dtype: torch.dtype) -> str:
    return f"{d.name}-{_h(str(d), 8)}-{str(dtype).removeprefix('torch.')}"


def copy_dir(checkpoint: str | Path, dtype: torch.dtype) -> Path:
    """Where the copy of `checkpoint`'s experts in `dtype` lives: `<name>-<path key>-<dtype>-<weights key>`, the last
    key from what identifies the checkpoint's weights (every copy of one directory shares the name's head)."""
    d = Path(checkpoint).resolve()
    files = [d / INDEX] if (d / INDEX).is_file() else []
    files += sorted(d.glob("*.safetensors"))
    ident = "\n".join([f"{FORMAT}"] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files])
    return copies_root() / f"{_stem(d, dtype)}-{_h(ident, 16)}"


def prune(out: Path) -> tuple[int, int]:
    """Remove, in one pass over the copies, those a cache should no longer keep: (the other copies of the directory
    and dtype that `out` copies, made before its weights changed, which retraining or re-carving into one directory
    would otherwise pile up; the copies whose `SOURCE` no longer holds a checkpoint, deleted or moved). Copies
    without a `SOURCE` and temporary directories stay. An engine still reading one keeps its open files (POSIX),
    so this is safe while older servers run; it runs before a new copy is sized, so their space counts as free."""
    stem, older, orphans = out.name.rsplit("-", 1)[0], 0, 0
    for d in out.parent.glob("*") if out.parent.is_dir() else ():
        if d == out or d.name.startswith(".") or not d.is_dir():
            continue
        if d.name.rsplit("-", 1)[0] == stem:
            older += 1
        elif _source_gone(d):
            orphans += 1
        else:
            continue
        shutil.rmtree(d, ignore_errors=True)
    return older, orphans


def _source_gone(copy: Path) -> bool:
    try:
        src = (copy / SOURCE).read_text().strip()
    except OSError:  # no SOURCE: made by hand or by an older readmoe, left alone
        return False
    return bool(src) and not is_checkpoint(src)


def copy_bytes(ckpt: Checkpoint, keys: Sequence[str], dtype: torch.dtype) -> int:
    return sum(math.prod(ckpt.shape(k)) for k in keys) * dtype.itemsize


def wider(ckpt: Checkpoint, keys: Sequence[str], dtype: torch.dtype) -> bool:
    """Whether any expert tensor is stored in a wider dtype than it is served in (what a copy would spare)."""
    return any(ckpt.dtype(k).is_floating_point and ckpt.dtype(k).itemsize > dtype.itemsize for k in keys)


def build(ckpt: Checkpoint, keys: Sequence[str], dtype: torch.dtype, out: Path, group: int = 3,
          max_shard_bytes: int = 1 << 30, source: str | Path | None = None) -> Path:
    """Write `keys` of `ckpt` in `dtype` to the checkpoint directory `out` (replaced only once whole); `group`
    tensors (one expert's projections) are never split across shards. `source`: the checkpoint directory, recorded
    so that `prune` can tell when it is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        w = ShardWriter(tmp, max_shard_bytes)
        for i in range(0, len(keys), group):
            w.add({k: cast(ckpt.read(k), dtype, k) for k in keys[i:i + group]})
        w.close()
        if source is not None:
            (tmp / SOURCE).write_text(f"{Path(source).resolve()}\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another engine finished the same copy first: keep theirs
            if not is_checkpoint(out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_copy(mode: PackMode, checkpoint: str | Path, ckpt: Checkpoint, keys: Sequence[str],
                 dtype: torch.dtype, reloads: bool = True) -> tuple[Path | None, str]:
    """(the copy's directory, or None to read the checkpoint itself; why). Builds the copy if it is missing.
    `reloads`: experts are loaded while serving; without reloads (every expert resident) they are read once at
    start, so auto makes no copy, which would only cost disk space."""
    if mode not in (True, False, "auto"):
        raise UserError(f"`expert_copy` must be auto, on or off, not '{mode}'")
    if mode is False:
        return None, "set explicitly: experts are read from the checkpoint"
    if mode == "auto" and not reloads:
        return None, "auto: every expert resident, read from the checkpoint at start only"
    if not wider(ckpt, keys, dtype):
        return None, f"the checkpoint's experts are already in {str(dtype).removeprefix('torch.')}: read as stored"
    out = copy_dir(checkpoint, dtype)
    gone = _removed(*prune(out))
    if is_checkpoint(out):
        return out, f"reused the {str(dtype).removeprefix('torch.')} copy in {out}{gone}"
    need = copy_bytes(ckpt, keys, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if mode == "auto" and need > AUTO_DISK_FRACTION * free:
        return None, (f"auto: a {need / 1e9:.1f} GB copy would take over {AUTO_DISK_FRACTION:.0%} of the "
                      f"{free / 1e9:.1f} GB free under {out.parent}: experts are cast on every load{gone}")
    try:
        build(ckpt, keys, dtype, out, source=checkpoint)
    except OSError as e:
        if mode is True:
            raise UserError(f"could not write the experts' {dtype} copy to {out.parent} ({e.strerror or e}): free "
                            f"{need / 1e9:.1f} GB there, point READMOE_EXPERT_COPIES elsewhere, or set `expert_copy` off") from None
        return None, f"auto: writing the copy failed ({e.strerror or e}): experts are cast on every load{gone}"
    return out, f"built a {need / 1e9:.2f} GB {str(dtype).removeprefix('torch.')} copy in {out}{gone}"


def _removed(older: int, orphans: int) -> str:
    what = [f"{older} older cop{'y' if older == 1 else 'ies'} of this checkpoint"] if older else []
    what += [f"{orphans} cop{'y' if orphans == 1 else 'ies'} of deleted checkpoints"] if orphans else []
    return f" (removed {' and '.join(what)})" if what else ""
