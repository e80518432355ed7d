"""Safetensors checkpoints read one tensor at a time and written shard by shard.

Why not `safe_open`: it memory-maps the file, and every page a read touches stays
in the process's resident set until the file is closed. Reading a 13 GB parent, or
serving experts from a checkpoint for hours, would then grow the resident set to
the file's size, which is exactly what streaming carve and an expert store with a
small cache must avoid. Here a tensor is read with `pread` straight into a buffer
the caller owns (the page cache still serves repeated reads), from a single
`model.safetensors` or the shards named by `model.safetensors.index.json`, the
layout `save_pretrained` writes and `from_pretrained` reads.
"""

from __future__ import annotations

import bisect
import json
import math
import mmap
import os
import struct
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _new_map(n: int) -> mmap.mmap:
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # 2 MB pages: faulting a fresh 40 MB buffer in took 14 ms, now 3 ms
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def _tensor(m: mmap.mmap, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(m, dtype=dtype, count=math.prod(shape)).view(shape)


class MapPool:
    """Uninitialised CPU tensors in anonymous memory maps, a map handed out again once no tensor uses it.

    For buffers that come and go by the hundred megabytes (an expert cache's loads): from malloc, glibc raises
    its mmap threshold after the first frees and serves them from the heap, which then keeps what they freed;
    measured on a 1B-shaped engine at capacity 1, that held 1 GB more than the cache ever did at once. A fresh
    map, though, pays a page fault per page on first write: 0.65 ms of the 1.0 ms an expert of the demo took to
    load from the checkpoint (reading it from the page cache took 0.15 ms), on every load. So maps are recycled:
    a map is free once every tensor on it has died (a tensor holds a reference to its map; CPython's reference
    count says when none is left). A request takes the smallest free map that holds it and is at most `slack`
    times its size, else a new map; free maps beyond `keep` times the largest request are unmapped, so memory
    still follows what the cache holds."""

    def __init__(self, slack: float = 1.5, keep: float = 4.0):
        self.slack, self.keep = slack, keep
        self._maps: list[mmap.mmap] = []  # by size (len), ascending
        self._largest = 0
        self.reused = self.created = 0
        self._lock = threading.Lock()
        probe = [_new_map(mmap.PAGESIZE)]
        self._free_refs = sys.getrefcount(probe[0])  # a map only the pool's list references

    def _is_free(self, i: int) -> bool:
        return sys.getrefcount(self._maps[i]) <= self._free_refs

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            self._largest = max(self._largest, n)
            i = bisect.bisect_left(self._maps, n, key=len)
            while i < len(self._maps) and len(self._maps[i]) <= self.slack * n and not self._is_free(i):
                i += 1
            if i < len(self._maps) and len(self._maps[i]) <= self.slack * n:
                self.reused += 1
                return _tensor(self._maps[i], shape, dtype)
            m = _new_map(n)
            t = _tensor(m, shape, dtype)
            self.created += 1
            # Spare maps (free, not taken) beyond keep x the largest request are unmapped, the largest first
            spare = [j for j in range(len(self._maps)) if self._is_free(j)]
            total = sum(len(self._maps[j]) for j in spare)
            drop = set()
            while spare and total > self.keep * self._largest:
                j = spare.pop()
                total -= len(self._maps[j])
                drop.add(j)
                self._maps[j].close()
            self._maps = [x for j, x in enumerate(self._maps) if j not in drop]
            bisect.insort(self._maps, m, key=len)
        return t


class TensorFile:
    """One safetensors file: its header parsed once, tensors read on demand without a memory map."""

    _fd = -1  # until the file is open: a header that fails to parse leaves nothing to close

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.info = header
        self._fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.info)

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.info[key]["dtype"]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.info[key]["shape"])

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, in its stored dtype; into `out` (a contiguous CPU tensor of that dtype and shape) if given."""
        start, end = self.info[key]["data_offsets"]
        if out is None:
            out = torch.empty(self.shape(key), dtype=self.dtype(key))
        if out.nbytes != end - start or not out.is_contiguous():
            raise ValueError(f"buffer for '{key}' has {out.nbytes} bytes, the tensor {end - start}")
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        got = 0
        while got < len(view):  # pread may return less than asked for large reads
            n = os.preadv(self._fd, [view[got:]], self.base + start + got)
            if n <= 0:
                raise OSError(f"{self.path} is truncated: '{key}' ends past the end of the file")
            got += n
        return out

    def close(self, _close=os.close) -> None:  # bound now: at interpreter exit `os` may already be gone
        if self._fd >= 0:
            _close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


class Checkpoint:
    """The tensors of a checkpoint directory, single-file or sharded, by name."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if (d / INDEX).is_file():
            weight_map = json.loads((d / INDEX).read_text())["weight_map"]
            self.files = {name: TensorFile(d / name) for name in sorted(set(weight_map.values()))}
            self.where = {k: self.files[name] for k, name in weight_map.items()}
        elif (d / SINGLE).is_file():
            f = TensorFile(d / SINGLE)
            self.files, self.where = {SINGLE: f}, dict.fromkeys(f.keys(), f)
        else:
            raise FileNotFoundError(f"'{d}' holds neither {SINGLE} nor {INDEX}")

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key].dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if key not in self.where:
            raise KeyError(f"checkpoint has no tensor '{key}'")
        return self.where[key].read(key, out)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def is_checkpoint(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / INDEX).is_file() or (d / SINGLE).is_file()


class ShardWriter:
    """Writes tensors into shards of about `max_shard_bytes` as they come, so at most one shard is held.

    Shards are named `model-0000i-of-0000n.safetensors` with an index once `close()` knows n, or, if one shard
    suffices, written as the single `model.safetensors`, exactly as `save_pretrained` lays them out."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 1 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add a group (for example one layer); a group is never split across shards."""
        if self.pending and self.pending_bytes + sum(t.nbytes for t in tensors.values()) > self.max:
            self._flush()
        for k, t in tensors.items():
            self.pending[k] = t.contiguous()
            self.pending_bytes += t.nbytes

    def _flush(self) -> None:
        path = self.dir / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            os.replace(self.written[0][0], self.dir / SINGLE)
            return
        n, weight_map = len(self.written), {}
        for i, (path, keys) in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
