"""Corpus loading and the windowing protocol (exact token counts, slices, errors)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FakeTokenizer
from kvpack.data import Corpus, cut_windows, load_corpus, load_windows, tokenize
from kvpack.errors import DataError, KVPackError

pytestmark = pytest.mark.usefixtures("one_thread")


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs), encoding="utf-8")
    return path


# --- windowing -------------------------------------------------------------------------------

def test_plain_text_windows_exact_counts(tmp_path, fake_tokenizer):
    path = tmp_path / "small.txt"
    path.write_text(words(103), encoding="utf-8")  # 103 tokens with the fake tokenizer
    w = load_windows(fake_tokenizer, str(path), seqlen=10)
    assert w.shape == (10, 10)  # the last 3 tokens (a partial window) are dropped
    assert w.dtype == torch.long
    assert w.flatten().tolist() == list(range(100))  # contiguous, non-overlapping, in order
    assert fake_tokenizer.calls == 1  # tokenized once, not per window


def test_exact_multiple_keeps_last_window(tmp_path, fake_tokenizer):
    path = tmp_path / "exact.txt"
    path.write_text(words(40), encoding="utf-8")
    w = load_windows(fake_tokenizer, str(path), seqlen=8)
    assert w.shape == (5, 8)
    assert w[-1].tolist() == list(range(32, 40))


def test_default_special_tokens_are_kept_once_at_start(tmp_path):
    tok = FakeTokenizer(bos=True)
    path = tmp_path / "bos.txt"
    path.write_text(words(20), encoding="utf-8")
    w = load_windows(tok, str(path), seqlen=7)
    # 21 tokens: BOS + 20 words -> 3 windows; only the first window starts with BOS.
    assert w.shape == (3, 7)
    assert w[0, 0].item() == 999
    assert (w[1:] != 999).all()


def test_max_windows_keeps_first_n(tmp_path, fake_tokenizer):
    path = tmp_path / "small.txt"
    path.write_text(words(100), encoding="utf-8")
    w = load_windows(fake_tokenizer, str(path), seqlen=10, max_windows=3)
    assert w.shape == (3, 10)
    assert w.flatten().tolist() == list(range(30))
    # more than available: all whole windows
    assert load_windows(fake_tokenizer, str(path), seqlen=10, max_windows=50).shape == (10, 10)


@given(n=st.integers(0, 300), seqlen=st.integers(2, 64), max_windows=st.one_of(st.none(), st.integers(1, 20)))
@settings(max_examples=200, deadline=None)
def test_cut_windows_counts(n, seqlen, max_windows):
    ids = torch.arange(n)
    expected = n // seqlen if max_windows is None else min(n // seqlen, max_windows)
    if expected == 0:
        with pytest.raises(DataError, match="fewer than one window"):
            cut_windows(ids, seqlen, max_windows)
        return
    w = cut_windows(ids, seqlen, max_windows)
    assert w.shape == (expected, seqlen)
    assert torch.equal(w.flatten(), torch.arange(expected * seqlen))


@pytest.mark.parametrize("bad", [0, -1, -3])
def test_nonpositive_max_windows_rejected(bad):
    with pytest.raises(DataError):
        cut_windows(torch.arange(100), 10, bad)
    with pytest.raises(DataError, match="max_windows"):
        cut_windows(torch.arange(100), 10, bad)


@pytest.mark.parametrize("seqlen", [0, 1, -5])
def test_bad_seqlen(seqlen):
    with pytest.raises(DataError, match="seqlen"):
        cut_windows(torch.arange(100), seqlen)


def test_too_short_text(tmp_path, fake_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text(words(9), encoding="utf-8")
    with pytest.raises(DataError, match="9 tokens.*fewer than one window of 10"):
        load_windows(fake_tokenizer, str(path), seqlen=10)


# --- jsonl and slices --------------------------------------------------------------------------

def test_jsonl_joined_with_blank_line(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["first doc", "second\ndoc", "third"])
    corpus = load_corpus(str(path))
    assert isinstance(corpus, Corpus)
    assert corpus.text == "first doc\n\nsecond\ndoc\n\nthird"
    assert corpus.documents == 3
    assert corpus.source == str(path)


def test_jsonl_document_slices(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a", "b", "c", "d"])
    assert load_corpus(f"{path}[1:]").text == "b\n\nc\n\nd"
    assert load_corpus(f"{path}[:2]").text == "a\n\nb"
    assert load_corpus(f"{path}[1:3]").documents == 2
    assert load_corpus(f"{path}[-1:]").text == "d"
    assert load_corpus(f"{path}[1:]").spec == f"{path}[1:]"


def test_jsonl_slices_partition_the_tokens(tmp_path, fake_tokenizer):
    docs = [words(7, 100 * i) for i in range(6)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    whole = tokenize(fake_tokenizer, load_corpus(str(path)).text)
    head = tokenize(fake_tokenizer, load_corpus(f"{path}[:2]").text)
    tail = tokenize(fake_tokenizer, load_corpus(f"{path}[2:]").text)
    assert whole.numel() == 42 and head.numel() == 14 and tail.numel() == 28


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "x"}\n\n   \n{"text": "y"}\n', encoding="utf-8")
    assert load_corpus(str(path)).text == "x\n\ny"


def test_plain_text_read_whole(tmp_path):
    path = tmp_path / "plain.txt"
    raw = " = Title = \n\n line one \n\n\n line two\n"
    path.write_text(raw, encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.text == raw  # byte-exact: no stripping, no re-joining
    assert corpus.documents == 1


def test_named_set_from_kvpack_data(tmp_path, monkeypatch, fake_tokenizer):
    (tmp_path / "c4").mkdir()
    write_jsonl(tmp_path / "c4" / "c4-validation-sample.jsonl", [words(5), words(5, 5), words(5, 10)])
    monkeypatch.setenv("KVPACK_DATA", str(tmp_path))
    corpus = load_corpus("c4[1:]")
    assert corpus.documents == 2 and corpus.source.endswith("c4-validation-sample.jsonl")
    w = load_windows(fake_tokenizer, "c4", seqlen=5)
    assert w.shape == (3, 5)


# --- errors ----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="neither a named set"):
        load_corpus(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize(
    "line",
    ['{"url": "no text here"}', '"just a string"', "not json at all", "[1, 2]", '{"text": null}', '{"text": 5}'],
)
def test_jsonl_line_without_text(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_corpus(str(path))


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_corpus(str(path))


@pytest.mark.parametrize("content", ["", "   \n\n  "])
def test_empty_text(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_corpus(str(path))


def test_slice_selecting_nothing(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a", "b"])
    with pytest.raises(DataError, match="no text"):
        load_corpus(f"{path}[5:]")


@pytest.mark.parametrize("name", ["wikitext2", "c4", "c4[:10]"])
def test_named_set_missing_offline(tmp_path, monkeypatch, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("KVPACK_DATA", str(empty))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError) as info:
        load_corpus(name)
    message = str(info.value)
    expected = "wikitext-2-raw/wiki.test.raw" if name == "wikitext2" else "c4/c4-validation-sample.jsonl"
    assert f"$KVPACK_DATA/{expected}" in message
    assert str(empty) in message
    assert isinstance(info.value, KVPackError)


def test_named_set_missing_when_kvpack_data_unset(monkeypatch):
    monkeypatch.delenv("KVPACK_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"KVPACK_DATA=<unset>"):
        load_corpus("wikitext2")


# --- the shared corpora and the real tokenizer --------------------------------------------------

def test_shared_wikitext_is_read_whole(shared_corpora):
    corpus = load_corpus("wikitext2")
    assert corpus.source.endswith("wikitext-2-raw/wiki.test.raw")
    assert corpus.text.startswith(" \n = Robert Boulter = \n")
    assert len(corpus.text.encode("utf-8")) == 1_290_590  # the file as is (see ../shared/data/README.md)


def test_shared_c4_has_1000_documents(shared_corpora):
    corpus = load_corpus("c4")
    assert corpus.documents == 1000
    assert load_corpus("c4[500:]").documents == 500


def test_real_tokenizer_protocol(tmp_path, smollm2):
    _, tokenizer = smollm2
    docs = ["The quick brown fox jumps over the lazy dog.", "A second document, with some punctuation!"] * 20
    path = write_jsonl(tmp_path / "real.jsonl", docs)
    joined = "\n\n".join(docs)
    expected = tokenizer(joined)["input_ids"]
    seqlen = 32
    w = load_windows(tokenizer, str(path), seqlen)
    assert w.shape == (len(expected) // seqlen, seqlen)
    assert w.flatten().tolist() == expected[: w.numel()]
    # "\n\n" really separates the documents: joining with a single space tokenizes differently
    assert tokenizer(" ".join(docs))["input_ids"] != expected


# --- calibration text the model writes itself ------------------------------------------------

def test_self_written_windows_are_seeded_cached_and_calibrate(tmp_path, monkeypatch):
    from conftest import make_tiny_model, make_tiny_tokenizer
    from kvpack.recipes.calibrate import calibrate
    from kvpack.recipes.self_data import generate_self_windows, self_windows

    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path))
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    ids = self_windows(model, tok, 3, 48, progress=False)
    assert ids.shape == (3, 48) and bool((ids[:, 0] == tok.bos_token_id).all())
    assert not bool(torch.isin(ids[:, 2:], torch.tensor(tok.all_special_ids)).any())  # special tokens suppressed
    assert len(list((tmp_path / "self-data").glob("*.pt"))) == 1
    assert torch.equal(self_windows(model, tok, 3, 48, progress=False), ids)  # from the disk cache
    assert torch.equal(generate_self_windows(model, tok, 3, 48, progress=False), ids)  # seeded
    assert not torch.equal(generate_self_windows(model, tok, 3, 48, seed=1, progress=False), ids)
    recipe = calibrate(model, tok, "kvquant-3bit-1pct", data="self", windows=3, seqlen=48, progress=False)
    assert recipe.calibration["data"] == "self" and recipe.calibration["windows"] == 3
    with pytest.raises(DataError, match="512"):
        self_windows(model, tok, 1, 600, progress=False)


def test_describe_data_names_source_and_documents(tmp_path):
    from kvpack.data import describe_data

    path = write_jsonl(tmp_path / "d.jsonl", ["a b", "c d", "e"])
    assert describe_data(f"{path}[:2]").startswith(f"{path}[:2]: 2 document(s) from {path}")
