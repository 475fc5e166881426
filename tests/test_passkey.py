"""Passkey retrieval mechanics on a tiny model (the model itself is random: accuracy is not checked)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from kvpack.evaluate import passkey

pytestmark = pytest.mark.usefixtures("one_thread")


class WordTokenizer:
    """One id per character class run; enough to place the needle exactly."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(ch) % 100) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 3 + 32) for i in ids if i >= 3)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_needle_depth(depth):
    tok = WordTokenizer()
    ids = passkey.build_prompt(tok, 600, depth, 31415)[0].tolist()
    assert len(ids) == 600 and ids[0] == tok.bos_token_id
    needle = tok(passkey.NEEDLE.format(key=31415))["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i:i + len(needle)] == needle]
    assert len(starts) == 1
    filler = 600 - 1 - len(tok(passkey.INTRO)["input_ids"]) - len(needle) - len(tok(passkey.QUESTION)["input_ids"])
    position = (starts[0] - 1 - len(tok(passkey.INTRO)["input_ids"])) / filler
    sentence = len(tok(passkey.FILLER)["input_ids"]) / filler  # the needle sits on a sentence boundary
    assert abs(position - depth) <= sentence + 1e-9


def test_run_table_and_heatmap(tmp_path):
    from test_attention import nuq_recipe

    model = make_tiny_model("llama", vocab_size=128)
    tok = WordTokenizer()
    rows = passkey.run_passkey(model, tok, {"fp16": None, "kvquant": nuq_recipe(model, 4, 0.01)}, [80, 120], [0.0, 1.0],
                               trials=1, new_tokens=3, log=lambda s: None)
    assert len(rows) == 8 and {r["method"] for r in rows} == {"fp16", "kvquant"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["answers"]) == 1 for r in rows)
    assert "depth (columns)" in passkey.table(rows)
    assert passkey.heatmap(rows, tmp_path / "pk.png").stat().st_size > 1000


def test_by_length_weights_trials():
    rows = [{"method": "m", "length": 10, "depth": 0.0, "accuracy": 1.0, "trials": 1},
            {"method": "m", "length": 10, "depth": 1.0, "accuracy": 0.0, "trials": 3},
            {"method": "m", "length": 20, "depth": 0.0, "accuracy": 0.5, "trials": 2}]
    out = passkey.by_length(rows)
    assert [(r["length"], r["trials"]) for r in out] == [(10, 4), (20, 2)]
    assert out[0]["accuracy"] == 0.25 and out[1]["accuracy"] == 0.5
