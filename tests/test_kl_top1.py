"""KL divergence and top-1 agreement against the unquantized model, simulated and through the real cache."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

from kvpack.evaluate.perplexity import Divergence, simulated_perplexity
from kvpack.evaluate.streaming import streaming_perplexity
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    return make_tiny_model("llama"), torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(7))


def test_divergence_by_hand():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = torch.log(torch.tensor([[0.25, 0.75], [0.6, 0.4]]))
    div = Divergence()
    div.add(ref, q + 3.0)  # logits: any shift gives the same distribution
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) + (0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4))
    assert div.mean_kl == pytest.approx(expected / 2, rel=1e-5)
    assert div.top1 == 0.5 and div.tokens == 2  # row 0: argmax 0 vs 1; row 1: both 0
    with pytest.raises(ValueError):
        div.add(ref, q[:1])


def test_simulated_kl_top1(setup):
    model, windows = setup
    fp16 = simulated_perplexity(model, windows, Recipe.baseline("fp16", 2), progress=False)
    assert 0 <= fp16.kl < 1e-6 and fp16.top1 == 1.0
    int2 = simulated_perplexity(model, windows, Recipe.baseline("int2:pre-rope", 2), progress=False)
    assert int2.kl > 1e-4 and int2.top1 <= 1.0
    plain = simulated_perplexity(model, windows, Recipe.baseline("int2:pre-rope", 2), progress=False, reference=False)
    assert plain.kl is None and plain.top1 is None and plain.ppl == int2.ppl


def test_real_cache_kl_top1(setup):
    model, windows = setup
    fp16 = streaming_perplexity(model, windows, Recipe.baseline("fp16", 2), chunk=1, progress=False)
    assert 0 <= fp16.kl < 1e-6 and fp16.top1 == 1.0
    recipe = Recipe.baseline("int2:pre-rope", 2)
    sim = simulated_perplexity(model, windows, recipe, progress=False)
    whole = streaming_perplexity(model, windows, recipe, chunk=40, progress=False)  # one prefill = the simulation
    assert whole.kl == pytest.approx(sim.kl, rel=1e-4) and whole.top1 == sim.top1
    decode = streaming_perplexity(model, windows, recipe, chunk=3, progress=False)
    assert decode.kl > 1e-4


def test_many_recipes_window_by_window_equal_one_at_a_time(setup):
    """simulated_perplexities shares each window's reference forward; every result equals its own run."""
    from kvpack.evaluate.perplexity import simulated_perplexities
    model, ids = setup
    recipes = [Recipe.baseline(name, model.config.num_hidden_layers) for name in ("fp16", "int4", "kivi-2:recent8:g8")]
    together = simulated_perplexities(model, ids, recipes, progress=False)
    for recipe, got in zip(recipes, together):
        alone = simulated_perplexity(model, ids, recipe, progress=False)
        assert got.method == alone.method and got.tokens == alone.tokens
        assert got.nll == pytest.approx(alone.nll, rel=1e-6) and got.kl == pytest.approx(alone.kl, rel=1e-4, abs=1e-9)
        assert got.top1 == alone.top1 and got.bits_per_element == pytest.approx(alone.bits_per_element)
    assert together[1].nll != together[0].nll
