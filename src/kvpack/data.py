"""Corpora and evaluation windows.

Protocol (how results are compared, kept exact): a `.jsonl` file's `text` fields are joined
with "\\n\\n"; any other file is read whole as UTF-8; the text is tokenized once with the
tokenizer's default special tokens; it is cut into non-overlapping windows of `seqlen` tokens,
the last partial window dropped; `max_windows` keeps the first N.

A spec is a named set (`wikitext2`, `c4`) or a path, optionally followed by a document slice
for jsonl data: `c4[:500]` (documents 0..499), `c4[500:]` (the rest). Named sets are looked
up in `$KVPACK_DATA`, then fetched with the `datasets` library when it is installed and online.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpack.errors import DataError

NAMED_SETS = {
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
    "c4": "c4/c4-validation-sample.jsonl",
}
_SLICE = re.compile(r"^(?P<base>.+?)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus: its spec, where it came from, and its text."""

    spec: str
    source: str
    text: str
    documents: int


def _split_slice(spec: str) -> tuple[str, slice | None]:
    match = _SLICE.match(spec)
    if not match:
        return spec, None
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    return match["base"], slice(start, stop)


def _find_named(name: str) -> Path | None:
    root = os.environ.get("KVPACK_DATA")
    if root:
        path = Path(root) / NAMED_SETS[name]
        if path.is_file():
            return path
    return None


def _documents_from_hub(name: str) -> list[str]:
    try:
        import datasets  # type: ignore
    except ImportError:
        datasets = None
    hint = (
        f"Named corpus '{name}' was not found. Put the file at $KVPACK_DATA/{NAMED_SETS[name]} "
        f"(KVPACK_DATA={os.environ.get('KVPACK_DATA', '<unset>')}), pass a file path with --data PATH, "
        "or install the 'datasets' package and go online. To calibrate without any text, use --calib-data self "
        "(data=\"self\": text the model writes itself)."
    )
    if datasets is None:
        raise DataError(hint)
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return ["\n\n".join(rows["text"])]
        rows = datasets.load_dataset(
            "allenai/c4", data_files="en/c4-validation.00000-of-00008.json.gz", split="train"
        )
        return list(rows["text"][:1000])
    except Exception as exc:  # network or hub failure: say what to do instead
        raise DataError(f"{hint} (datasets failed: {exc})") from exc


def _read_documents(path: Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            docs = []
            with path.open(encoding="utf-8") as handle:
                for lineno, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                        if not isinstance(text, str):
                            raise TypeError(f"'text' is {type(text).__name__}, not a string")
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise DataError(f"{path}:{lineno}: each line must be a JSON object with a 'text' field ({exc}).") from exc
                    docs.append(text)
            return docs
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not UTF-8 text: {exc}") from exc


def load_corpus(spec: str) -> Corpus:
    """Load the text named by `spec` (see module docstring)."""
    base, doc_slice = _split_slice(str(spec))
    if base in NAMED_SETS:
        path = _find_named(base)
        if path is not None:
            docs, source = _read_documents(path), str(path)
        else:
            docs, source = _documents_from_hub(base), f"hub:{base}"
    else:
        path = Path(base).expanduser()
        if not path.is_file():
            raise DataError(
                f"Data '{spec}' is neither a named set ({', '.join(NAMED_SETS)}) nor an existing file. "
                "Pass --data wikitext2, --data c4, or a path to a .jsonl/.txt file."
            )
        docs, source = _read_documents(path), str(path)
    if doc_slice is not None:
        docs = docs[doc_slice]
    if not docs or not any(d.strip() for d in docs):
        raise DataError(f"Data '{spec}' holds no text.")
    return Corpus(spec=str(spec), source=source, text="\n\n".join(docs), documents=len(docs))


def describe_data(spec: str) -> str:
    """One line saying what `spec` is: where its text comes from and how many documents it holds."""
    corpus = load_corpus(spec)
    root = os.environ.get("KVPACK_DATA")
    source = corpus.source
    if root and source.startswith(str(Path(root))):
        source = "$KVPACK_DATA/" + str(Path(source).relative_to(root))
    return f"{spec}: {corpus.documents} document(s) from {source}, {len(corpus.text)} characters"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [n_tokens] of the whole text, with the tokenizer's default special tokens."""
    ids = tokenizer(text, return_tensors="pt", return_attention_mask=False)["input_ids"]
    return ids[0].long()


def cut_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n_windows, seqlen] of `ids` [n_tokens]; the last partial window is dropped."""
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 tokens, got {seqlen}.")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1, got {max_windows}.")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"The text has {ids.numel()} tokens, fewer than one window of {seqlen}; use a smaller --seqlen or more text.")
    return ids[: n * seqlen].view(n, seqlen)


def load_windows(tokenizer, spec: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Load `spec`, tokenize it once and cut it into windows [n_windows, seqlen]."""
    return cut_windows(tokenize(tokenizer, load_corpus(spec).text), seqlen, max_windows)
