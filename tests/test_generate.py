"""kvpack.generate on a tiny random model: save/load continues exactly, appended prompts, errors, CLI."""
import json

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.errors import CacheFileError, DataError
from kvpack.generation import generate, read_context
from kvpack.recipes.recipe import Recipe

PROMPT = " ".join(f"w{(7 * i) % 120 + 3}" for i in range(60))


@pytest.fixture
def tiny():
    return make_tiny_model("llama"), make_tiny_tokenizer()


@pytest.mark.parametrize("method", ["int4:pre-rope", "kivi-2:g8"])
def test_saved_cache_continues_exactly_as_the_saving_run(tiny, tmp_path, one_thread, method):
    model, tok = tiny
    recipe = Recipe.baseline(method, 2)
    path = tmp_path / "prompt.kvpack"
    first = generate(PROMPT, model=model, tokenizer=tok, recipe=recipe, max_new_tokens=12, save_cache=path, prefill_chunk=16)
    assert first.context_tokens == 60 and first.new_tokens == 12 and first.cached_tokens == 0
    assert read_context(path)["ids"] == tok(PROMPT)["input_ids"]
    again = generate(None, model=model, tokenizer=tok, recipe=recipe, max_new_tokens=12, load_cache=path)
    assert again.token_ids == first.token_ids and again.text == first.text
    assert again.cached_tokens == 59 and again.context_tokens == 60
    assert first.cache_bytes > 0 and first.fp16_bytes == again.fp16_bytes > 0


def test_prompt_is_appended_after_the_loaded_cache(tiny, tmp_path, one_thread):
    model, tok = tiny
    recipe = Recipe.baseline("fp16", 2)
    head, tail = PROMPT[:len(PROMPT) // 2].rsplit(" ", 1)[0], None
    tail = PROMPT[len(head):]
    whole = generate(PROMPT, model=model, tokenizer=tok, recipe=recipe, max_new_tokens=8)
    path = tmp_path / "head.kvpack"
    generate(head, model=model, tokenizer=tok, recipe=recipe, max_new_tokens=1, save_cache=path)
    resumed = generate(tail, model=model, tokenizer=tok, recipe=recipe, max_new_tokens=8, load_cache=path)
    assert resumed.context_tokens == whole.context_tokens
    assert resumed.token_ids == whole.token_ids


def test_errors_name_the_problem(tiny, tmp_path):
    model, tok = tiny
    recipe = Recipe.baseline("int4", 2)
    with pytest.raises(DataError, match="512 positions"):
        generate(" ".join(["w5"] * 500), model=model, tokenizer=tok, recipe=recipe, max_new_tokens=20)
    with pytest.raises(DataError, match="Nothing to continue"):
        generate(None, model=model, tokenizer=tok, recipe=recipe)
    with pytest.raises(CacheFileError, match="No saved cache"):
        generate(None, model=model, tokenizer=tok, recipe=recipe, load_cache=tmp_path / "missing.kvpack")
    plain = tmp_path / "plain.kvpack"
    from kvpack.cache.cache import CompressedCache

    cache = CompressedCache(model, recipe)
    model(torch.tensor([[5, 6, 7]]), cache=cache)
    cache.save(plain)
    with pytest.raises(CacheFileError, match="not its context tokens"):
        generate(None, model=model, tokenizer=tok, recipe=recipe, load_cache=plain)
    other = Recipe.baseline("int3", 2)
    saved = tmp_path / "int4.kvpack"
    generate(PROMPT, model=model, tokenizer=tok, recipe=recipe, max_new_tokens=1, save_cache=saved)
    with pytest.raises(CacheFileError):
        generate(None, model=model, tokenizer=tok, recipe=other, load_cache=saved)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    recipe = Recipe.baseline("int4", 2)
    runs = [generate(PROMPT, model=model, tokenizer=tok, recipe=recipe, max_new_tokens=10, sample=True, seed=s).token_ids
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_cli_generate_streams_and_writes_json(tiny, tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from kvpack.cli.app import app

    model, tok = tiny
    monkeypatch.setattr(sys.modules["kvpack.generation"], "load_model", lambda spec: (model, tok))
    prompt = tmp_path / "doc.txt"
    prompt.write_text(PROMPT)
    out = tmp_path / "gen.json"
    args = ["generate", "--model", "tiny", "--method", "int4", "--prompt-file", str(prompt), "--max-new-tokens", "6",
            "--json", str(out), "--save-cache", str(tmp_path / "c.kvpack"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert {"text", "new_tokens", "cache_bytes", "fp16_bytes"} <= set(row) and row["new_tokens"] == 6
    assert row["text"] in result.output
    again = CliRunner().invoke(app, ["generate", "--model", "tiny", "--load-cache", str(tmp_path / "c.kvpack"),
                                     "--max-new-tokens", "6", "--json", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["token_ids"] == row["token_ids"]
    missing = CliRunner().invoke(app, ["generate", "--model", "tiny", "--prompt-file", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
