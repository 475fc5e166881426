"""Streaming perplexity through the real cache on a tiny model: one-chunk prefill equals the simulation
exactly, token-by-token agrees within float noise, bits come from the cache's tensors; CLI wiring."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.evaluate.streaming import streaming_perplexity, window_stream_nll
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    return make_tiny_model("llama"), torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", ["int4:pre-rope:sink1", "nf3:pre-rope"])
def test_real_matches_simulated(setup, method):
    model, windows = setup
    recipe = Recipe.baseline(method, 2)
    sim = simulated_perplexity(model, windows, recipe, progress=False)
    whole = streaming_perplexity(model, windows, recipe, chunk=40, progress=False)
    assert math.isclose(whole.ppl, sim.ppl, rel_tol=1e-6)
    decode = streaming_perplexity(model, windows, recipe, chunk=1, progress=False)
    assert math.isclose(decode.ppl, sim.ppl, rel_tol=1e-4)
    assert decode.tokens == sim.tokens == 2 * 39 and decode.windows == 2
    # measured bits: the simulation's count plus the int32 position log (4 bytes per token)
    elements_per_token = 2 * 2 * 2 * 16
    assert math.isclose(decode.bits_per_element, sim.bits_per_element + 32 / elements_per_token, rel_tol=0.02)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["int4:pre-rope:sink1:recent5", "kivi-2:recent5:g8"])
def test_recent_window_served_per_query(method, attn):
    """With a recent window the simulation has every query read its own window unchanged, as the cache
    decoding token by token holds it (KIVI: keys leave the window in whole groups of tokens, values one by
    one); with served_window=False it reads the window-end split instead (the last tokens of the whole window
    unchanged), and the bits counted are the same."""
    from kvpack.evaluate.perplexity import simulated_perplexity
    from kvpack.recipes.simulate import Simulator

    model = make_tiny_model("llama", attn=attn)
    windows = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(7))
    recipe = Recipe.baseline(method, 2)
    served = simulated_perplexity(model, windows, recipe, progress=False)
    decode = streaming_perplexity(model, windows, recipe, chunk=1, progress=False)
    assert math.isclose(decode.ppl, served.ppl, rel_tol=1e-4)
    window_end = simulated_perplexity(model, windows, recipe, progress=False,
                                      simulator=Simulator(recipe, served_window=False))
    assert served.kl < 0.8 * window_end.kl  # every query reads its own last tokens unchanged: less error
    assert served.bits_per_element == window_end.bits_per_element  # and not what a cache of this length holds


def test_window_starts_follow_the_stream():
    """Per query, the first token the stream (cache/stream.py) still holds in fp16 after appending it."""
    from kvpack.cache.stream import TokenStream
    from kvpack.recipes.simulate import Simulator

    recipe = Recipe.baseline("kivi-2:recent5:g8:sink2", 1)
    starts = Simulator(recipe).window_starts(0, 40)
    for codec, start in zip((recipe.key_codecs[0], recipe.value_codecs[0]), starts):
        stream = TokenStream(codec, 2, 5)
        for i in range(40):
            stream.append(torch.randn(1, 2, 1, 16))
            assert max(2, stream.head_len + stream.body.tokens) == int(start[i])  # the sink: unchanged either way
    assert Simulator(Recipe.baseline("int4", 1)).window_starts(0, 40) is None


def test_chunked_prefill_and_counts(setup):
    model, windows = setup
    recipe = Recipe.baseline("int4:pre-rope", 2)
    nll, n, cache = window_stream_nll(model, windows[:1], recipe, chunk=7)
    assert n == 39 and cache.get_seq_length() == 39  # the last token is only a target
    assert nll > 0
    with pytest.raises(ValueError):
        window_stream_nll(model, windows[:1], recipe, chunk=0)


def test_cli_run_eval_real_cache(tmp_path):
    from kvpack.evaluate.run import run_eval

    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 120, (200,), generator=g)))
    rows = run_eval(str(model_dir), str(text), ["int4:pre-rope"], seqlen=32, max_windows=2, progress=False,
                    cache="both", chunk=4)
    modes = [(r["method"], r["mode"]) for r in rows]
    assert modes == [("fp16", "simulated"), ("fp16", "real"), ("int4:pre-rope", "simulated"), ("int4:pre-rope", "real")]
    sim, real = rows[2], rows[3]
    assert real["chunk"] == 4 and abs(real["ppl"] / sim["ppl"] - 1) < 0.02
    assert rows[3]["delta"] == pytest.approx(real["ppl"] - rows[1]["ppl"])  # deltas against fp16 of the same mode
