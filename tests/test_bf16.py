"""bf16 models on the CPU: the simulation, the real cache (packed attention and the torch reference) and
the refusal of activations beyond 16-bit storage, naming the layer (never silent inf)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from kvpack.cache import CompressedCache
from kvpack.errors import ActivationRangeError
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.hf.attention import cache_kwargs
from kvpack.kernels import dispatch
from kvpack.recipes import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(3))


def bf16_model():
    return make_tiny_model("llama").to(torch.bfloat16)


@torch.no_grad()
def test_lossless_pre_rope_cache_matches_dynamic_cache_in_bf16():
    model = bf16_model()
    ref = model(IDS).logits.float()
    cache = CompressedCache(model, Recipe.baseline("fp16:pre-rope:sink1", 2), block_tokens=8)
    out = model(IDS[:, :30], **cache_kwargs(cache)).logits.float()
    step = model(IDS[:, 30:31], **cache_kwargs(cache)).logits.float()
    assert out.dtype == torch.float32 and cache.layers[0].dtype == torch.bfloat16
    torch.testing.assert_close(out, ref[:, :30], atol=0.05, rtol=0.02)
    torch.testing.assert_close(step[:, 0], ref[:, 30], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("method", ["int4:pre-rope:key-channel:g8", "kivi-4:recent4:g8", "nf4"])
@torch.no_grad()
def test_simulation_and_real_cache_in_bf16(method):
    model = bf16_model()
    recipe = Recipe.baseline(method, 2)
    sim = simulated_perplexity(model, IDS[:1], recipe, progress=False)
    assert torch.isfinite(torch.tensor(sim.ppl)) and sim.bits_per_element < 16
    logits = {}
    for packed in (False, True):
        cache = CompressedCache(model, recipe, packed_attention=packed, block_tokens=8)
        model(IDS[:, :24], **cache_kwargs(cache))
        logits[packed] = torch.stack([model(IDS[:, t:t + 1], **cache_kwargs(cache)).logits[:, -1].float()
                                      for t in range(24, 30)])
    torch.testing.assert_close(logits[True], logits[False], atol=0.05, rtol=0.02)
    # the kernels' torch reference reads the same storage with a bf16 query
    layer = cache.layers[1]
    query = torch.randn(2, 4, 1, 16, dtype=torch.bfloat16)
    ref = dispatch.layer_attention(layer, query, backend="torch", rope=cache.packed.rope)
    auto = dispatch.layer_attention(layer, query, backend="auto", rope=cache.packed.rope)
    assert ref.dtype == torch.bfloat16 and torch.isfinite(ref.float()).all()
    torch.testing.assert_close(auto.float(), ref.float(), atol=0.02, rtol=0.02)


@torch.no_grad()
def test_values_beyond_fp16_range_are_refused_with_the_layer_named():
    model = bf16_model()
    model.model.layers[1].self_attn.v_proj.weight.mul_(1e6)  # bf16 holds it, fp16 storage would not
    with pytest.raises(ActivationRangeError, match="layer 1 values reach .* beyond the fp16 range"):
        model(IDS, **cache_kwargs(CompressedCache(model, Recipe.baseline("int4", 2))))
    with pytest.raises(ActivationRangeError, match="layer 1 values"):
        simulated_perplexity(model, IDS[:1], Recipe.baseline("int4", 2), progress=False)
