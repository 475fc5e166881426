"""Packed attention (kvpack.kernels.dispatch): the same numbers as decode-then-attend, on tiny random models.

Recipes are built from codecs with synthetic parameters (no calibration: equality of the two attention
paths does not depend on how good the codebooks are), with many outliers so that every sparse path runs.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_ARCHS, make_tiny_model
from kvpack.cache import packed
from kvpack.cache.cache import CompressedCache
from kvpack.codecs.nuq import NuqCodec
from kvpack.codecs.rvq import RVQCodec
from kvpack.hf.attention import cache_kwargs
from kvpack.hf.models import text_config
from kvpack.kernels import dispatch as attention
from kvpack.kernels import cpu, reference
from kvpack.methods.names import parse_method
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _dims(model) -> tuple[int, int, int]:
    cfg = text_config(model.config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


class CscKeys(NuqCodec):
    """Keys whose outliers are stored column-wise (rows (b, h, c) over the tokens of a block), the other sparse
    layout the kernels read (kernels.layout.sparse_mode 0)."""

    def _rows(self, x):
        return x.transpose(-1, -2).reshape(-1, x.shape[-2])

    def _unrows(self, rows, shape):
        *lead, heads, tokens, dim = shape
        return rows.reshape(*lead, heads, dim, tokens).transpose(-1, -2)


def nuq_recipe(model, bits: int = 4, frac: float = 0.05, seed: int = 0, **options) -> Recipe:
    """kvquant-style recipe: per-channel keys (fixed ranges), per-token values, outliers, random levels."""
    layers, heads, dim = _dims(model)
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    per_head = options.pop("per_head", False)
    key_type = CscKeys if options.pop("csc", False) else NuqCodec
    for _ in range(layers):
        levels = torch.randn(heads if per_head else 1, 1 << bits, generator=g).sort(-1).values
        levels = levels / levels.abs().amax(-1, keepdim=True)
        zero = 0.1 * torch.randn(heads, dim, generator=g)
        scale = 0.5 + torch.rand(heads, dim, generator=g)
        keys.append(key_type(levels, "channel", heads, dim, frac, zero=zero, scale=scale))
        values.append(NuqCodec(levels, "token", heads, dim, frac, span=options.get("span", "all")))
    return Recipe(parse_method(f"kvquant-{bits}bit-{int(frac * 100)}pct"), keys, values)


def rvq_recipe(model, depth: int = 3, codes: int = 32, group: int = 8, outliers: bool = True, seed: int = 0) -> Recipe:
    layers, heads, dim = _dims(model)
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for _ in range(layers):
        books = torch.randn(depth, codes, group, generator=g) * torch.tensor([1.0, 0.4, 0.15])[:depth, None, None]
        bounds = {}
        if outliers:
            bounds = dict(lower=-torch.full((heads, dim), 1.2), upper=torch.full((heads, dim), 1.2))
        keys.append(RVQCodec(books, dim, "strided", **bounds))
        values.append(RVQCodec(books, dim, "contiguous", **bounds))
    return Recipe(parse_method(f"rvq-d{depth}-c{codes}-g{group}"), keys, values)


RECIPES = {
    "nuq4": lambda m: nuq_recipe(m, 4),
    "nuq3-headcb-vspan-head": lambda m: nuq_recipe(m, 3, per_head=True, span="head"),
    "nuq2-csc-keys": lambda m: nuq_recipe(m, 2, 0.02, csc=True),
    "rvq": lambda m: rvq_recipe(m),
    "int4-baseline": lambda m: Recipe.baseline("int4:pre-rope", _dims(m)[0]),
}


def _generate(model, recipe, ids, mask, packed: bool, steps: int = 6, backend: str | None = None, block_tokens=128):
    cache = CompressedCache(model, recipe, packed_attention=packed, attention_backend=backend, block_tokens=block_tokens)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=steps, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=2)
    return out.sequences, torch.stack(out.scores), cache


@pytest.mark.parametrize("arch,attn", TINY_ARCHS, ids=[f"{a}-{i}" for a, i in TINY_ARCHS])
@pytest.mark.parametrize("kind", ["nuq4", "rvq"])
def test_generate_matches_decode_path(arch, attn, kind):
    """generate() with packed attention == the decode-then-attend path, batch 2 with left padding."""
    model = make_tiny_model(arch, attn)
    recipe = RECIPES[kind](model)
    ids = torch.randint(3, 120, (2, 21), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 2
    seq_ref, scores_ref, _ = _generate(model, recipe, ids, mask, packed=False)
    seq, scores, cache = _generate(model, recipe, ids, mask, packed=True)
    assert cache.packed.calls >= 5 * _dims(model)[0]  # every decode step of every layer went through it
    torch.testing.assert_close(scores, scores_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(seq, seq_ref)


@pytest.mark.parametrize("kind", ["nuq3-headcb-vspan-head", "rvq", "int4-baseline"])
def test_long_generation_and_sliding_window(kind):
    """Gemma2 (sliding window 16, softcap, eager): 24 decode steps free blocks on the way."""
    model = make_tiny_model("gemma2", "eager")
    recipe = RECIPES[kind](model)
    ids = torch.randint(3, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    seq_ref, scores_ref, _ = _generate(model, recipe, ids, mask, packed=False, steps=24, block_tokens=8)
    seq, scores, cache = _generate(model, recipe, ids, mask, packed=True, steps=24, block_tokens=8)
    assert cache.layers[0].first_slot > 0  # the sliding layer freed tokens
    torch.testing.assert_close(scores, scores_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(seq, seq_ref)


def _filled_cache(model, recipe, batch=2, tokens=70, chunk=None):
    cache = CompressedCache(model, recipe, packed_attention=False)
    ids = torch.randint(3, 120, (batch, tokens), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        step = chunk or tokens
        for start in range(0, tokens, step):
            model(ids[:, start:start + step], **cache_kwargs(cache))
    cache.packed = packed.attach(cache, True)
    return cache


def _decoded_attention(layer, cache, query, mask, softcap=None):
    """What the decode path computes: every stored key decoded and rotated, eager attention in fp32."""
    k = layer.k.read(torch.float32)
    if cache.pre_rope:
        cos, sin = cache.rope_for(layer.layer_idx, layer.first_slot, layer.first_slot + k.shape[-2])
        from kvpack.hf.rope import apply_rope

        k = apply_rope(k, cos.float(), sin.float())
    v = layer.v.read(torch.float32)
    groups = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = query @ k.transpose(-1, -2) * query.shape[-1] ** -0.5
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("kind", list(RECIPES))
@pytest.mark.parametrize("masking", ["none", "bool", "float", "softcap"])
def test_layer_attention_backends_agree(kind, masking):
    """One layer, 3 query tokens (GQA: 6 query rows per KV head): torch reference, C++ kernels, decoded."""
    model = make_tiny_model("llama")
    cache = _filled_cache(model, RECIPES[kind](model), chunk=9)  # several runs of blocks of 9 tokens
    layer = cache.layers[1]
    total = layer.k.stored
    query = torch.randn(2, 4, 3, 16, generator=torch.Generator().manual_seed(7))
    mask = softcap = None
    if masking == "bool":
        mask = torch.rand(2, 1, 3, total, generator=torch.Generator().manual_seed(8)) > 0.3
        mask[..., 0] = True
    elif masking == "float":
        mask = torch.randn(2, 1, 3, total, generator=torch.Generator().manual_seed(9))
    elif masking == "softcap":
        softcap = 2.0
    if mask is None:  # no mask and several queries: causal, aligned at the end
        expected = _decoded_attention(layer, cache, query, torch.ones(3, total, dtype=torch.bool).tril(total - 3), softcap)
    else:
        expected = _decoded_attention(layer, cache, query, mask, softcap)
    paths = []
    ref = attention.layer_attention(layer, query, mask, softcap=softcap, backend="torch", rope=cache.packed.rope, paths=paths)
    assert {p for _, p in paths} == {"torch"}
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    paths = []
    fast = attention.layer_attention(layer, query, mask, softcap=softcap, backend="auto", rope=cache.packed.rope, paths=paths)
    expect_cpu = kind != "int4-baseline"
    assert (paths == [("layer", "cpu")]) == expect_cpu, paths
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


def test_chunked_streaming_uses_packed_path():
    """Teacher-forced chunks of 4 tokens (causal inside the chunk) == the decode path."""
    model = make_tiny_model("qwen2")
    recipe = RECIPES["nuq3-headcb-vspan-head"](model)
    ids = torch.randint(3, 120, (1, 33), generator=torch.Generator().manual_seed(4))
    outs = {}
    for packed in (False, True):
        cache = CompressedCache(model, recipe, packed_attention=packed)
        with torch.no_grad():
            outs[packed] = torch.cat([model(ids[:, s:s + 4], **cache_kwargs(cache)).logits for s in range(0, 33, 4)], 1)
        if packed:
            assert cache.packed.calls > 0
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)


def test_not_claimed_with_grad_long_queries_blockwise():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, RECIPES["nuq4"](model))
    ids = torch.randint(3, 120, (1, 40))
    model(ids, **cache_kwargs(cache))  # grad mode on: decode path
    assert cache.packed.calls == 0
    with torch.no_grad():
        model(ids[:, :20], **cache_kwargs(cache))  # 20 > max_queries: blockwise path
        assert cache.packed.calls == 2 and cache.packed.blockwise_calls == 2
        model(ids[:, :2], **cache_kwargs(cache))
    assert cache.packed.calls == 4 and cache.packed.blockwise_calls == 2 and not cache.packed.pending
    assert model.config._attn_implementation == "sdpa"  # restored after the forward


def test_reference_decodes_bounded_chunks(monkeypatch):
    """The torch reference never decodes more than CHUNK_TOKENS tokens (plus one block) at a time."""
    model = make_tiny_model("llama")
    cache = _filled_cache(model, RECIPES["nuq4"](model), batch=1, tokens=64, chunk=1)  # 63 one-token blocks
    seen = []
    codec = cache.layers[0].key_codec
    original = type(codec).decode

    def spy(self, enc):
        seen.append(enc.shape[0])
        return original(self, enc)

    monkeypatch.setattr(type(codec), "decode", spy)
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 8)
    query = torch.randn(1, 4, 1, 16)
    out = attention.layer_attention(cache.layers[0], query, None, backend="torch", rope=cache.packed.rope,
                                    paths=None)
    assert max(seen) <= 8 and len(seen) > 10
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 2048)
    full = attention.layer_attention(cache.layers[0], query, None, backend="torch", rope=cache.packed.rope)
    torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)


def test_rope_table_follows_positions():
    """The table extends as tokens arrive and is rebuilt after a crop changes logged positions."""
    model = make_tiny_model("llama")
    cache = CompressedCache(model, RECIPES["nuq4"](model))
    ids = torch.randint(3, 120, (1, 30))
    with torch.no_grad():
        model(ids[:, :20], **cache_kwargs(cache))
        for t in range(20, 25):
            model(ids[:, t:t + 1], **cache_kwargs(cache))
        table = cache.packed.rope
        got = table.get(0, 0, 25).full()
        want = cache.rope_for(0, 0, 25)
        torch.testing.assert_close(got[0], want[0].float(), rtol=0, atol=0)
        cache.crop(-5)
        cache.log_positions(20, torch.arange(100, 105).unsqueeze(0))  # different positions for the same slots
        got = table.get(0, 0, 25).full()
        torch.testing.assert_close(got[0], cache.rope_for(0, 0, 25)[0].float(), rtol=0, atol=0)


def test_triton_modules_import_without_triton():
    """Without triton the kernel modules import, report unavailable and decline every run."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "from kvpack.kernels import triton_attention, triton_encode\n"
        "assert not triton_attention.HAVE_TRITON and not triton_attention.available()\n"
        "assert triton_attention.key_scores(None, None, None, None, None) is False\n"
        "assert triton_encode.nuq_encode(None, None) is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bits,frac,span,per_head,csc", [(2, 0.03, "all", False, True), (3, 0.05, "head", True, False),
                                                         (4, 0.0, "all", False, False), (4, 0.01, "all", True, False)])
def test_cpu_fused_encode_matches_codec(bits, frac, span, per_head, csc):
    """Appends on the CPU use the C++ encoder: the same bytes as NuqCodec.encode."""
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    model = make_tiny_model("llama")
    recipe = nuq_recipe(model, bits, frac, per_head=per_head, span=span, csc=csc)
    x = torch.randn(2, 2, 7, 16, generator=torch.Generator().manual_seed(bits)) * 1.3
    x[0, 1, 3, 5] = x[0, 1, 3, 6]  # ties
    for codec in (recipe.key_codecs[0], recipe.value_codecs[0]):
        want, got = codec.encode(x), cpu.nuq_encode(codec, x)
        assert got is not None and set(got.tensors) == set(want.tensors) and got.shape == want.shape
        for name, t in want.tensors.items():
            assert got.tensors[name].dtype == t.dtype and torch.equal(got.tensors[name], t), name


@pytest.mark.parametrize("outliers", [False, True])
def test_rvq_values_by_code_histograms(outliers):
    """Long RVQ runs take the histogram path for p . v (and outlier corrections): same result as the reference."""
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    model = make_tiny_model("llama")
    cache = _filled_cache(model, rvq_recipe(model, outliers=outliers), batch=1, tokens=300, chunk=300)
    layer = cache.layers[0]
    assert layer.v.body.runs[0].tokens >= 256
    query = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(2))
    ref = attention.layer_attention(layer, query, None, backend="torch", rope=cache.packed.rope)
    fast = attention.layer_attention(layer, query, None, backend="auto", rope=cache.packed.rope)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_split_rope_tables_match_the_rotary_module_at_long_positions():
    """The kernels' cos/sin, composed from hi/lo tables, equal the rotary module's to float rounding of the angles at
    positions up to 40K, and the tables grow with the square root of the positions, not with them."""
    model = make_tiny_model("llama")
    cache = CompressedCache(model, RECIPES["nuq4"](model))
    positions = torch.tensor([[0, 1, 63, 64, 65, 1000, 8191, 20000, 32767, 40000]], dtype=torch.int32)
    cache.log_positions(0, positions)
    at = cache.packed.rope.get(0, 0, positions.shape[1])
    tables = at.kernel_tables()
    assert tables is not None and tables.hi.shape[0] > 40000 >> tables.shift
    cos, sin = at.full()
    half = tables.rot // 2
    got_cos, got_sin = tables.compose(positions[0])
    assert (got_cos - cos[0, :, :half]).abs().max() < 2e-3 and (got_sin - sin[0, :, :half]).abs().max() < 2e-3
    small = positions[0] < 2048
    assert (got_cos[small] - cos[0, small, :half]).abs().max() < 1e-5
    assert cache.packed.rope.nbytes() < 4 * tables.rot * ((40000 >> tables.shift) + 1 + (1 << tables.shift)) * 1.3


def test_packed_cpu_attention_at_large_positions_matches_decoding():
    """Keys logged at positions 30000+ (custom position ids): the C++ kernel's composed RoPE agrees with the decode
    path's module cos/sin."""
    if not cpu.available():
        pytest.skip(f"C++ kernels unavailable here: {cpu.error()}")
    model = make_tiny_model("llama")
    cache = CompressedCache(model, RECIPES["nuq4"](model))
    ids = torch.randint(3, 120, (1, 40))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), position_ids=torch.arange(30000, 30040).unsqueeze(0))
    layer = cache.layers[0]
    heads, dim = layer.k.body.runs[0].block_shape[1], layer.k.body.runs[0].block_shape[3]
    query = torch.randn(1, heads * 2, 1, dim)
    paths: list = []
    got = attention.layer_attention(layer, query, None, backend="auto", rope=cache.packed.rope, paths=paths)
    want = attention.layer_attention(layer, query, None, backend="torch", rope=cache.packed.rope)
    assert ("layer", "cpu") in paths
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
