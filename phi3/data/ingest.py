"""Raw files to JSONL shards: HTML pages, plain text, Python sources, fortune files.

Each document becomes a record `{"id", "text", "source", "path"}`. HTML is reduced to its visible
text (scripts, styles and navigation dropped; Sphinx pages keep only their body). Fortune files
(`%`-separated) are split into fortunes and grouped `group` to a document.
"""

from __future__ import annotations

import gzip
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import Phi3Error
from .io import write_records

HTML_SUFFIXES = (".html", ".htm")
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".py")
SKIP_TAGS = {"script", "style", "nav", "header", "footer", "noscript", "head"}
SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "headerlink", "navigation", "breadcrumbs", "nav"}
BLOCK_TAGS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "dt", "dd", "section",
              "blockquote", "table", "ul", "ol", "dl"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        if self.skip_stack or tag in SKIP_TAGS or classes & SKIP_CLASSES:
            if tag not in ("br", "img", "meta", "link", "hr", "input"):
                self.skip_stack.append(tag)
            return
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip_stack:
            if self.skip_stack[-1] == tag:
                self.skip_stack.pop()
            elif tag in self.skip_stack:  # tolerate unclosed tags inside a skipped element
                while self.skip_stack and self.skip_stack.pop() != tag:
                    pass
            return
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_stack:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def split_fortunes(text: str, group: int) -> list[str]:
    items = [f.strip() for f in text.replace("\r\n", "\n").split("\n%\n")]
    items = [f.strip("%").strip() for f in items if f.strip("%").strip()]
    return ["\n\n".join(items[i:i + group]) for i in range(0, len(items), group)]


def documents_of(path: Path, kind: str, group: int) -> list[str]:
    """The documents in one raw file, by `kind` (auto, html, text, fortune)."""
    name = path.name.removesuffix(".gz")
    if kind == "auto":
        kind = "html" if name.endswith(HTML_SUFFIXES) else "text"
    text = read_text_file(path)
    if kind == "html":
        return [html_to_text(text)]
    if kind == "fortune":
        return split_fortunes(text, group)
    if kind == "text":
        return [text]
    raise Phi3Error(f"unknown document kind {kind!r} (expected auto, html, text or fortune)")


def raw_files(paths: Iterable[str | os.PathLike], kind: str) -> list[tuple[Path, str]]:
    """(file, name relative to its root) under `paths` (directories walked, sorted) that `kind` reads."""
    files: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append((p, p.name))
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                name = f.name.removesuffix(".gz")
                if kind == "fortune":
                    if "." not in name:  # fortune files have no suffix; their .dat indexes do
                        files.append((f, f.relative_to(p).as_posix()))
                elif name.endswith(HTML_SUFFIXES + TEXT_SUFFIXES) and (kind != "html" or name.endswith(HTML_SUFFIXES)):
                    files.append((f, f.relative_to(p).as_posix()))
        else:
            raise Phi3Error(f"{p}: no such file or directory")
    return files


def iter_records(paths, source: str, kind: str = "auto", group: int = 10, min_chars: int = 1) -> Iterator[dict]:
    for f, rel in raw_files(paths, kind):
        for j, doc in enumerate(documents_of(f, kind, group)):
            if len(doc.strip()) >= min_chars:
                yield {"id": f"{source}/{rel}#{j}", "text": doc, "source": source, "path": str(f)}


def ingest(paths, out_dir: str | os.PathLike, source: str, kind: str = "auto", group: int = 10,
           shard_size: int = 1000, limit: int | None = None, fmt: str = "jsonl") -> dict:
    """Write the documents under `paths` as shards `<source>-00000.jsonl`, ... in `out_dir`."""
    out_dir = Path(out_dir)
    shard: list[dict] = []
    n_docs = n_shards = 0
    suffix = ".parquet" if fmt == "parquet" else ".jsonl"

    def flush():
        nonlocal n_shards, shard
        if shard:
            write_records(out_dir / f"{source}-{n_shards:05d}{suffix}", shard)
            n_shards += 1
            shard = []

    for rec in iter_records(paths, source, kind, group):
        if limit is not None and n_docs >= limit:
            break
        shard.append(rec)
        n_docs += 1
        if len(shard) >= shard_size:
            flush()
    flush()
    if n_docs == 0:
        raise Phi3Error(f"no documents found under {', '.join(map(str, paths))} (kind {kind})")
    return {"stage": "ingest", "source": source, "out": n_docs, "shards": n_shards}
