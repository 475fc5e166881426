"""generate() modes with calibrated codecs that store variable-length outliers: beam search reorders them by
the codec's declared layout, assisted decoding crops inside blocks exactly (its output equals greedy
decoding with the same cache), and a codec that cannot be cut inside a block is refused with the fix."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import kvpack
from kvpack.cache import CompressedCache
from kvpack.errors import MethodError
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (800,), generator=torch.Generator().manual_seed(0))))
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    recipes = {m: kvpack.calibrate(model, tok, m, data=str(path), windows=3, seqlen=64, progress=False)
               for m in ("kvquant-3bit-1pct", "rvq-d2-c16-g8:1pct")}
    return model, recipes


def generate(model, recipe, **kwargs) -> torch.Tensor:
    cache = CompressedCache(model, recipe, block_tokens=8)
    with torch.no_grad():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=10, min_new_tokens=10,
                              pad_token_id=0, do_sample=False, **kwargs, **cache_kwargs(cache))


@pytest.mark.parametrize("method", ["kvquant-3bit-1pct", "rvq-d2-c16-g8:1pct"])
def test_assisted_equals_greedy_and_beam_search_runs(calibrated, method):
    model, recipes = calibrated
    greedy = generate(model, recipes[method])
    assistant = make_tiny_model("llama", seed=1)
    assert torch.equal(generate(model, recipes[method], assistant_model=assistant), greedy)
    beams = generate(model, recipes[method], num_beams=3)
    assert beams.shape == greedy.shape and (beams[:, :40] == IDS).all()


def test_beam_reorder_moves_outliers_with_their_rows(calibrated):
    """Reordering batch rows of a cache with outliers equals building the cache from reordered inputs."""
    model, recipes = calibrated
    ids = torch.randint(3, 120, (3, 20), generator=torch.Generator().manual_seed(2))
    order = torch.tensor([2, 0, 2])
    a, b = (CompressedCache(model, recipes["kvquant-3bit-1pct"], block_tokens=8) for _ in range(2))
    with torch.no_grad():
        model(ids, **cache_kwargs(a))
        a.reorder_cache(order)
        model(ids[order], **cache_kwargs(b))
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.read_all()[0], lb.read_all()[0])
        torch.testing.assert_close(la.read_all()[1], lb.read_all()[1])


def test_crop_inside_a_block_refused_with_the_fix_for_token_group_codecs():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, Recipe.baseline("int4:key-channel:g8", 2), block_tokens=8)
    with torch.no_grad():
        model(IDS[:, :24], **cache_kwargs(cache))
    with pytest.raises(MethodError, match="recent window"):
        cache.crop(20)
