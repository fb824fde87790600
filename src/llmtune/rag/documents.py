"""Documents for retrieval: .txt, .md and .pdf files read page by page and cut into overlapping word windows."""

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pypdf import PdfReader

from llmtune.errors import UserError

DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf")
# A line such as "[page 12]" starts page 12 of a text file (the plain-text extractions of PDFs carry them).
PAGE_MARKER = re.compile(r"^[ \t]*\[page[ \t]+(\d+)\][ \t]*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str  # file name relative to the documents folder, e.g. "HR_Policy.pdf" or "sub/notes.md"
    page: int | None  # 1-based page (a PDF page or a "[page N]" marker); None if unknown


def chunk_text(text: str, chunk_size: int, chunk_overlap: int) -> list[str]:
    """Windows of chunk_size words, each starting chunk_size - chunk_overlap words after the previous one.

    E.g. 10 words, size 4, overlap 1: stride 3, windows start at 0, 3, 6 -> words 0-3, 3-6, 6-9. A window starting
    at 9 would hold only word 9, already in the previous window, so the windows stop once one reaches the last word.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap must be in [0, chunk_size={chunk_size}), got {chunk_overlap}")
    words = text.split()
    stride = chunk_size - chunk_overlap
    chunks = []
    for start in range(0, len(words), stride):
        chunks.append(" ".join(words[start:start + chunk_size]))
        if start + chunk_size >= len(words):
            break
    return chunks


def load_chunks(folder: str | Path, chunk_size: int, chunk_overlap: int,
                suffixes: Iterable[str] = DOCUMENT_SUFFIXES) -> list[Chunk]:
    """Chunks of every file under folder with one of the suffixes (.txt, .md, .pdf), ordered by relative path; a chunk
    never spans pages. A folder holding each document twice (a PDF and its extracted text) reads one kind only."""
    folder, suffixes = Path(folder), tuple(suffix.lower() for suffix in suffixes)
    kinds = ", ".join(suffixes)
    if not folder.is_dir():
        raise UserError(f"documents folder not found: {folder}; set dataset.documents to a folder of {kinds} files")
    files = sorted((path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in suffixes),
                   key=lambda path: path.relative_to(folder).as_posix())
    if not files:
        raise UserError(f"documents folder {folder} has no {kinds} files; add some, or set dataset.documents "
                        "to the folder that holds them (dataset.document_types lists the kinds read)")
    chunks = []
    for path in files:
        source = path.relative_to(folder).as_posix()
        for page, text in _read_pages(path):
            chunks += [Chunk(text=chunk, source=source, page=page)
                       for chunk in chunk_text(text, chunk_size, chunk_overlap)]
    if not chunks:
        raise UserError(f"documents folder {folder} has no text: its {len(files)} file(s) are empty or scanned images; "
                        "add text files, or run OCR on the PDFs first")
    return chunks


def content_hash(chunks_or_texts: Iterable[Chunk | str]) -> str:
    """sha256 hex of the texts (with source and page for Chunks), in order; the same input gives the same hash."""
    digest = hashlib.sha256()
    for item in chunks_or_texts:
        fields = [item.text, item.source, item.page] if isinstance(item, Chunk) else [item]
        # JSON escapes newlines, so one line per item keeps ["a b"] and ["a", "b"] apart.
        digest.update(json.dumps(fields, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _read_pages(path: Path) -> list[tuple[int | None, str]]:
    """(page, text) for each page of one file."""
    if path.suffix.lower() == ".pdf":
        return _read_pdf_pages(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"could not read {path} as UTF-8 text: {error}; save it as UTF-8 or remove it from the "
                        "folder") from error
    return _split_at_page_markers(text)


def _read_pdf_pages(path: Path) -> list[tuple[int | None, str]]:
    # pypdf raises many kinds of exception for a damaged or encrypted file (PdfReadError, ValueError, KeyError, ...).
    try:
        return [(number, page.extract_text() or "") for number, page in enumerate(PdfReader(path).pages, start=1)]
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"could not read PDF {path}: {first_line}; re-export it or remove it from the "
                        "folder") from error


def _split_at_page_markers(text: str) -> list[tuple[int | None, str]]:
    """Parts of a text between "[page N]" lines, each with its N; text before the first marker has page None."""
    markers = list(PAGE_MARKER.finditer(text))
    if not markers:
        return [(None, text)]
    pages = [(None, text[:markers[0].start()])]
    for marker, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following else len(text)
        pages.append((int(marker.group(1)), text[marker.end():end]))
    return pages
