"""The compiled read path over kvpack's vLLM pages (`kernel.attend`, C++ `kvpack_pages_attention`) against the
torch reference `read.attend_torch`, on pages written by the real write path: the default model's recipes
(kvpack-2/3/4bit: per-channel widths, per-page key-outlier pools; kvquant-3bit-1pct: one width, per-token key
outlier slots) and the lossless fp16 slots, several requests of different lengths whose pages are scattered over
the pool, chunked prefill and decode in one step, sinks, GQA, pre-RoPE keys. Runs in .venv-vllm; skipped without
vLLM or without kvpack's C++ kernels."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from kvpack.errors import ActivationRangeError, NonFiniteError  # noqa: E402
from kvpack.integrations.vllm import kernel, native_prefill  # noqa: E402
from kvpack.integrations.vllm.config import KvpackVllmConfig, KvpackVllmError  # noqa: E402
from kvpack.integrations.vllm.layout import EngineLayout  # noqa: E402
from kvpack.integrations.vllm.pages import PagePool  # noqa: E402
from kvpack.integrations.vllm.read import attend, attend_torch, gather_kv  # noqa: E402
from kvpack.integrations.vllm.rope import RopeTable  # noqa: E402
from kvpack.integrations.vllm.slots import LayerSlots, nuq_part, raw_part  # noqa: E402
from kvpack.integrations.vllm.write import write_tokens  # noqa: E402
from kvpack.recipes.bundled import SHIPPED_DIR  # noqa: E402
from kvpack.recipes.recipe import Recipe  # noqa: E402

HEADS, DIM, BLOCK, LAYERS_USED = 3, 64, 16, (0, 17)


def needs_kernel():
    if not kernel.available():
        from kvpack.kernels import cpu

        pytest.skip(f"kvpack's C++ kernels are unavailable: {cpu.error()}")


def rope_table(max_len: int = 512, theta: float = 100000.0, dtype: torch.dtype = torch.float32) -> RopeTable:
    """A RopeTable with llama's rotate_half frequencies (no model config needed), rounded to a model `dtype` as
    `RopeTable` rounds it."""
    table = RopeTable.__new__(RopeTable)
    inv = 1.0 / theta ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)
    ang = torch.arange(max_len, dtype=torch.float32).unsqueeze(1) * inv
    ang = torch.cat([ang, ang], 1)
    table.cos, table.sin = ang.cos(), ang.sin()
    if dtype != torch.float32:
        table.exact, table.dtype = (table.cos, table.sin), dtype
        table.cos, table.sin = table.cos.to(dtype).float(), table.sin.to(dtype).float()
    return table


def make_layout(method: str, dtype: torch.dtype, key_outliers: str = "page", sinks: int | None = None) -> EngineLayout:
    if method == "fp16":
        layers = [LayerSlots(raw_part(HEADS, DIM, dtype), raw_part(HEADS, DIM, dtype), 0, dtype)] * 30
        return EngineLayout(KvpackVllmConfig(method="fp16"), None, layers, dtype, None, BLOCK)
    recipe = Recipe.load(SHIPPED_DIR / method)
    sink = recipe.settings.sink_tokens if sinks is None else sinks
    layers = []
    for kc, vc in zip(recipe.key_codecs, recipe.value_codecs):
        pooled = key_outliers == "page" and kc.outlier_frac > 0
        layers.append(LayerSlots(nuq_part(kc, 0 if pooled else 4), nuq_part(vc, None), sink, dtype,
                                 4 * BLOCK if pooled else 0))
    rope = rope_table(dtype=dtype) if recipe.settings.pre_rope else None
    return EngineLayout(KvpackVllmConfig(method=method, key_outliers=key_outliers), recipe, layers, dtype, rope, BLOCK)


def make_pool(layout: EngineLayout, blocks: int = 40) -> PagePool:
    c = layout.page_content_bytes()
    layers = len(layout.layers)  # vLLM's one buffer for all layers; layer 0's view of it
    buffer = torch.zeros(layers * blocks * BLOCK * c, dtype=torch.uint8).view(layers, blocks, 1, BLOCK, c)
    return PagePool(buffer[0], layout.layers)


def keys_like(layout: EngineLayout, layer: int, tokens: int, g: torch.Generator) -> torch.Tensor:
    """Post-RoPE-free keys [T, H, D] around the recipe's calibrated ranges, with ~2 outliers per token."""
    if layout.recipe is None:
        return torch.randn(tokens, HEADS, DIM, generator=g)
    kc = layout.recipe.key_codecs[layer]
    u = torch.rand(tokens, HEADS, DIM, generator=g) * 1.9 - 0.95
    k = u * kc.scale.squeeze(1) + kc.zero.squeeze(1)
    idx = torch.randint(0, tokens * HEADS * DIM, (2 * tokens,), generator=g)
    k.view(-1)[idx] += 20 * kc.scale.reshape(-1)[idx % (HEADS * DIM)]
    return k


def fill(layout: EngineLayout, pool: PagePool, layer: int, lens: list[int], cached: list[int], table: torch.Tensor,
         g: torch.Generator, compiled: bool = True) -> int:
    """Write tokens [0, cached[r]) of every request, in prefill chunks of 7 and then single tokens; the key
    outliers clamped."""
    clamped = 0
    for r, (length, done) in enumerate(zip(lens, cached)):
        k = keys_like(layout, layer, length, g)
        v = torch.randn(length, HEADS, DIM, generator=g)
        if layout.rope is not None:
            k = layout.rope.rotate(k, torch.arange(length))  # vLLM hands post-RoPE keys
        k, v = k.to(layout.dtype), v.to(layout.dtype)
        at = 0
        while at < done:
            step = 7 if at < done // 2 else 1
            b = min(done, at + step)
            pos = torch.arange(at, b)
            clamped += write_tokens(layout, pool, layer, k[at:b], v[at:b], table[r, pos // BLOCK] * BLOCK + pos % BLOCK,
                                    pos, compiled=compiled)
            at = b
    return clamped


def step(layout: EngineLayout, pool: PagePool, layer: int, lens: list[int], new: list[int], q_heads: int,
         g: torch.Generator):
    """Pages holding every request's earlier tokens and this step's new ones; the step's query and metadata."""
    per = -(-max(lens) // BLOCK)
    order = torch.randperm(pool.blocks, generator=g)[: len(lens) * per]
    table = order.view(len(lens), per).to(torch.int32)
    fill(layout, pool, layer, lens, lens, table, g)  # the step's new tokens are written before attention
    qsl = torch.tensor([0] + new).cumsum(0)
    query = torch.randn(int(qsl[-1]) + 2, q_heads, DIM, generator=g).to(layout.dtype)  # 2 padding tokens
    meta = SimpleNamespace(query_start_loc=qsl, seq_lens=torch.tensor(lens), block_table=table)
    return query, meta


def compare(layout: EngineLayout, lens: list[int], new: list[int], q_heads: int = 9, seed: int = 0) -> None:
    needs_kernel()
    g = torch.Generator().manual_seed(seed)
    for layer in LAYERS_USED:
        pool = make_pool(layout)
        query, meta = step(layout, pool, layer, lens, new, q_heads, g)
        n = int(meta.query_start_loc[-1])
        ref = torch.full(query.shape, 7.0, dtype=layout.dtype)
        out = torch.full(query.shape, 7.0, dtype=layout.dtype)
        attend_torch(layout, pool, layer, query, meta, DIM ** -0.5, ref)
        assert kernel.attend(layout, pool, layer, query, meta, DIM ** -0.5, out)
        assert torch.equal(out[n:], ref[n:])  # padding rows untouched
        err = (out[:n].float() - ref[:n].float()).abs().max() / ref[:n].float().abs().max()
        tol = 1e-4 if layout.dtype == torch.float32 else 1e-2  # bf16: one rounding of the output
        assert err < tol, f"layer {layer}: relative error {err:.2e}"


LENS, NEW = [40, 23, 1, 70, 17], [1, 9, 1, 1, 17]  # decode, chunked prefill (cached + new), a fresh prompt


@pytest.mark.parametrize("method", ["kvpack-3bit", "kvpack-4bit", "kvpack-2bit"])
def test_compiled_equals_torch_on_recipe_pages(method):
    compare(make_layout(method, torch.float32), LENS, NEW)


def test_compiled_equals_torch_per_token_key_outliers_and_sinks():
    layout = make_layout("kvquant-3bit-1pct", torch.float32, key_outliers="token", sinks=5)
    assert layout.layers[0].key.outlier_slots == 4 and layout.layers[0].sink_tokens == 5
    compare(layout, LENS, NEW, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_equals_torch_on_fp16_slots(dtype):
    compare(make_layout("fp16", dtype), LENS, NEW, seed=2)


def test_compiled_bf16_model_and_no_gqa():
    compare(make_layout("kvpack-3bit", torch.bfloat16), LENS, NEW, seed=3)
    compare(make_layout("kvpack-3bit", torch.bfloat16), [40, 23, 70], [1, 1, 1], seed=6)  # decode steps only
    compare(make_layout("kvpack-3bit", torch.float32), LENS, NEW, q_heads=HEADS, seed=4)


def test_long_prefill_spans_several_work_items():
    """A 150-token prompt: more query tokens than one work item holds (128 rows / 3 heads), keys over many tiles."""
    compare(make_layout("kvpack-3bit", torch.float32), [150, 60], [150, 1], seed=5)


def test_pool_outliers_and_rope_matter():
    """The kernel reads the pools and rotates keys: dropping the pools or RoPE changes its output."""
    needs_kernel()
    layout = make_layout("kvpack-3bit", torch.float32)
    g = torch.Generator().manual_seed(6)
    pool = make_pool(layout)
    query, meta = step(layout, pool, 5, LENS, NEW, 9, g)
    full = torch.zeros_like(query)
    assert kernel.attend(layout, pool, 5, query, meta, DIM ** -0.5, full)
    counts = pool.pools[5][:, :2].contiguous().view(torch.int16)
    assert int(counts.sum()) > 0
    saved = pool.pools[5].clone()
    pool.pools[5][:, :2] = 0
    no_pool = torch.zeros_like(query)
    kernel.attend(layout, pool, 5, query, meta, DIM ** -0.5, no_pool)
    pool.pools[5].copy_(saved)
    assert not torch.allclose(full, no_pool, rtol=1e-4, atol=1e-5)
    rope, layout.rope = layout.rope, None
    no_rope = torch.zeros_like(query)
    kernel.attend(layout, pool, 5, query, meta, DIM ** -0.5, no_rope)
    layout.rope = rope
    assert not torch.allclose(full, no_rope, rtol=1e-2, atol=1e-3)


def test_attend_selects_the_compiled_path(monkeypatch):
    needs_kernel()
    layout = make_layout("kvpack-3bit", torch.float32)
    pool = make_pool(layout)
    query, meta = step(layout, pool, 0, [12], [3], 9, torch.Generator().manual_seed(7))
    calls = []
    monkeypatch.setattr("kvpack.integrations.vllm.read.attend_torch", lambda *a: calls.append(a))
    attend(layout, pool, 0, query, meta, DIM ** -0.5, torch.zeros_like(query))
    assert calls == []
    monkeypatch.setattr(kernel, "_function", lambda: None)
    attend(layout, pool, 0, query, meta, DIM ** -0.5, torch.zeros_like(query))
    assert len(calls) == 1


@pytest.mark.parametrize("method,key_outliers", [("kvpack-3bit", "page"), ("kvpack-2bit", "page"),
                                                 ("kvpack-4bit", "token"), ("kvquant-3bit-1pct", "page")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_write_stores_the_torch_bytes(method, key_outliers, dtype):
    """The C++ writer (`kernel.write`) stores exactly the bytes of SlotPart.encode + write_pool: slots, pools, sink
    records, and counts the same clamped key outliers (pools of 1 entry per token on average: some overflow).
    bf16 inputs tie on clamping errors, where torch's topk orders the value outlier slots as it likes: the slots then
    decode identically."""
    needs_kernel()
    layout = make_layout(method, dtype, key_outliers=key_outliers)
    if key_outliers == "page":
        for i, layer in enumerate(layout.layers):
            layout.layers[i] = LayerSlots(layer.key, layer.value, layer.sink_tokens, dtype, BLOCK)
    for layer in LAYERS_USED:
        table = torch.randperm(40, generator=torch.Generator().manual_seed(layer))[:10].view(5, 2).to(torch.int32)
        pools, clamped = [], []
        for compiled in (False, True):
            pool = make_pool(layout)
            clamped.append(fill(layout, pool, layer, [30, 17, 1, 32, 9], [30, 17, 1, 32, 9], table,
                                torch.Generator().manual_seed(9), compiled=compiled))
            pools.append(pool)
        ref, got = pools
        lens = torch.tensor([30, 17, 1, 32, 9])
        for a, b in zip(gather_kv(layout, got, layer, lens, table), gather_kv(layout, ref, layer, lens, table)):
            assert torch.equal(a, b)
        if dtype == torch.float32:
            assert torch.equal(got.slots[layer], ref.slots[layer])
        assert torch.equal(got.pools[layer], ref.pools[layer])
        assert torch.equal(got.sinks[layer], ref.sinks[layer])
        assert clamped[1] == clamped[0]
        if key_outliers == "page":
            assert clamped[0] > 0 and int(ref.pools[layer][:, :2].contiguous().view(torch.int16).sum()) > 0
        assert int(ref.slots[layer].count_nonzero()) > 0


@pytest.mark.parametrize("method,key_outliers,sinks", [("kvpack-3bit", "page", None), ("kvquant-3bit-1pct", "token", 5)])
def test_dense_decode_equals_gather(method, key_outliers, sinks):
    """`kernel.dense` (the long-prefill route: every cached token decoded once) returns what the torch reference
    gathers: post-RoPE keys with pool or slot outliers and exact sinks, values, request after request."""
    needs_kernel()
    layout = make_layout(method, torch.float32, key_outliers=key_outliers, sinks=sinks)
    pool = make_pool(layout)
    g = torch.Generator().manual_seed(8)
    lens = [70, 5, 33]
    _, meta = step(layout, pool, 2, lens, [1, 1, 1], 9, g)
    seq = torch.tensor(lens, dtype=torch.int64)
    keys, values = kernel.dense(layout, pool, 2, seq, meta.block_table.to(torch.int32).contiguous(),
                                kernel._layer(layout.layers[2], layout.dtype))
    ref_k, ref_v = gather_kv(layout, pool, 2, seq, meta.block_table)
    assert keys.shape == ref_k.shape == (sum(lens), HEADS, DIM)
    torch.testing.assert_close(keys, ref_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, ref_v, rtol=1e-6, atol=1e-6)
    for dtype in (torch.bfloat16, torch.float16):  # decoded straight to the model's dtype: the float32 ones rounded
        narrow = kernel.dense(layout, pool, 2, seq, meta.block_table.to(torch.int32).contiguous(),
                              kernel._layer(layout.layers[2], layout.dtype), dtype)
        assert narrow[0].dtype == narrow[1].dtype == dtype
        assert torch.equal(narrow[0], keys.to(dtype)) and torch.equal(narrow[1], values.to(dtype))


def test_compiled_equals_torch_wide_heads_all_widths():
    """8 KV heads x 64 (512 channels: int16 outlier indices), per-channel widths 1..7 (one permute, two, a gather),
    per-head value ranges with outlier slots, per-token key outlier slots, sinks, GQA 2, decode and a long prefill."""
    from kvpack.codecs.nuq import NuqCodec

    needs_kernel()
    heads, dim, block = 8, 64, 16
    g = torch.Generator().manual_seed(9)
    widths = torch.tensor([1, 2, 3, 4, 5, 6, 7, 3] * 8).repeat_interleave(8)  # multiples of 8 channels per width
    levels = torch.randn(heads * dim, 128, generator=g).sort(-1).values
    keys = NuqCodec(levels, "channel", heads, dim, 0.02, zero=0.1 * torch.randn(heads, dim, generator=g),
                    scale=0.5 + torch.rand(heads, dim, generator=g), channel_bits=widths)
    values = NuqCodec(torch.linspace(-1, 1, 8), "token", heads, dim, 0.02, span="head")
    parts = LayerSlots(nuq_part(keys, 4), nuq_part(values, None), 2, torch.float32)
    assert parts.key.index_bytes == 2 and parts.value.outlier_slots > 0 and parts.value.scale_pairs == heads
    rope = rope_table()
    layout = EngineLayout(KvpackVllmConfig(method="kvquant-3bit-1pct", key_outliers="token"), None, [parts], torch.float32,
                          rope, block)
    blocks = 32
    c = layout.page_content_bytes()
    pool = PagePool(torch.zeros(blocks * block * c, dtype=torch.uint8).view(1, blocks, 1, block, c)[0], layout.layers)
    lens, new = [90, 37, 150], [1, 1, 150]
    table = torch.randperm(blocks, generator=g)[: 3 * 10].view(3, 10).to(torch.int32)
    for r, length in enumerate(lens):
        pos = torch.arange(length)
        k = rope.rotate(torch.randn(length, heads, dim, generator=g) * 0.8, pos)
        write_tokens(layout, pool, 0, k, torch.randn(length, heads, dim, generator=g),
                     table[r, pos // block] * block + pos % block, pos)
    qsl = torch.tensor([0] + new).cumsum(0)
    query = torch.randn(int(qsl[-1]), 2 * heads, dim, generator=g)
    meta = SimpleNamespace(query_start_loc=qsl, seq_lens=torch.tensor(lens), block_table=table)
    ref, out = torch.zeros_like(query), torch.zeros_like(query)
    attend_torch(layout, pool, 0, query, meta, dim ** -0.5, ref)
    assert kernel.attend(layout, pool, 0, query, meta, dim ** -0.5, out)
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, f"relative error {err:.2e}"


@pytest.mark.parametrize("lens,new", [([70, 1, 90, 40], [70, 1, 33, 1]),  # prefills apart: their rows gathered
                                      ([40, 1, 70, 90], [1, 1, 70, 33])])  # one run of prefills (vLLM's order): a slice
def test_bf16_prefill_through_vllms_kernel_equals_sdpa(monkeypatch, lens, new):
    """Prefill chunks of a bf16 model (a fresh prompt, a chunk after cached tokens, next to decode steps) attend
    through vLLM's own CPU kernel over the decoded pages (`native_prefill`): the same output as torch's SDPA."""
    needs_kernel()
    layout = make_layout("kvpack-3bit", torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    pool = make_pool(layout)
    query, meta = step(layout, pool, 3, lens, new, 9, g)
    native, sdpa = torch.zeros_like(query), torch.zeros_like(query)
    calls = []
    run_native = native_prefill.run
    monkeypatch.setattr(native_prefill, "run", lambda *a: calls.append(1) or run_native(*a))
    assert kernel.attend(layout, pool, 3, query, meta, DIM ** -0.5, native)
    assert calls == [1]
    refused = list(native_prefill._broken)  # a vLLM build or CPU whose kernel refuses: the SDPA fallback ran
    monkeypatch.setattr(native_prefill, "usable", lambda dtype, dim: False)
    assert kernel.attend(layout, pool, 3, query, meta, DIM ** -0.5, sdpa)
    err = (native.float() - sdpa.float()).abs().max() / sdpa.float().abs().max()
    assert err < 1e-2, f"relative error {err:.2e}"
    assert torch.equal(native[105:], sdpa[105:])  # padding rows untouched by both
    if refused:
        pytest.skip(f"vLLM's CPU kernel refused the prefill here ({refused[0]}); its SDPA fallback was checked")


def test_rope_split_tables_compose_the_table():
    """`split_tables` (RoPE of 16 consecutive positions by angle addition) reproduces a rotate_half table within
    float rounding, and refuses a table whose halves differ (the kernel then rotates token by token)."""
    rope = rope_table(2048)
    hi, lo = kernel.split_tables(rope.cos, rope.sin)
    p = torch.arange(2048)
    half = DIM // 2
    cos = hi[p // 16, :half] * lo[0].t()[p % 16] - hi[p // 16, half:] * lo[1].t()[p % 16]
    assert (cos - rope.cos[:, :half]).abs().max() < 1e-3  # the table's own angles are float32 (ulp 1.2e-4 at 2047)
    skewed = rope.cos.clone()
    skewed[:, half] += 0.5
    assert kernel.split_tables(skewed, rope.sin) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_table_holds_the_angles_the_model_rotates_with(dtype):
    """A bf16 / fp16 model's table holds vLLM's own cos_sin_cache in that dtype (the rotation vLLM applied to the keys
    it hands over: undone exactly on write, reapplied as the query has it on read); float32 keeps float32 angles."""
    from transformers import LlamaConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    config = LlamaConfig(hidden_size=4 * DIM, num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0,
                         max_position_embeddings=4096)
    table = RopeTable(config, 4096, dtype)
    with set_current_vllm_config(VllmConfig()):
        vllm_rope = get_rope(DIM, 4096, True, {"rope_type": "default", "rope_theta": 100000.0}, dtype)
    cos, sin = vllm_rope.cos_sin_cache.float().chunk(2, dim=-1)  # [positions, D / 2] each, in `dtype`
    half = DIM // 2
    assert vllm_rope.cos_sin_cache.dtype == dtype
    step = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # the dtype's relative step
    for ours, theirs in ((table.cos[:, :half], cos), (table.sin[:, half:], sin)):
        # equal, except where the two libraries' float32 cos/sin differ by an ulp right at a rounding boundary
        assert (ours != theirs).float().mean() < 1e-3
        assert ((ours - theirs).abs() <= step * theirs.abs().clamp(min=2.0 ** -14)).all()
    assert table.dtype == dtype and table.exact is not None
    exact = RopeTable(config, 4096, torch.float32)
    assert exact.exact is None and exact.dtype == torch.float32 and not torch.equal(exact.cos, table.cos)
    torch.testing.assert_close(exact.cos, table.exact[0])
    with pytest.raises(KvpackVllmError, match="float32, bfloat16 or float16"):
        RopeTable(config, 16, torch.float64)


def test_split_rope_tables_round_as_the_table(monkeypatch):
    """Decoded bf16-model keys match the torch reference, which rotates with the rounded rows: with AVX-512 the
    channel-major path, when the table is too large to be read as it is, composes cos/sin from float32 split tables
    and rounds them as the rows are (`pages::round_as`; far closer than without the rounding); with AVX2 the tiles
    read the rows."""
    needs_kernel()
    monkeypatch.setattr(kernel, "CHANNEL_MAJOR_ROPE_BYTES", 0)  # compose, as for a long max_model_len
    layout = make_layout("kvpack-3bit", torch.bfloat16)
    layout.rope = rope_table(2048, dtype=torch.bfloat16)
    pool = make_pool(layout, blocks=2 * 94)
    g = torch.Generator().manual_seed(9)
    lens = [1500, 300]
    _, meta = step(layout, pool, 2, lens, [1, 1], 9, g)
    seq, table = torch.tensor(lens, dtype=torch.int64), meta.block_table.to(torch.int32).contiguous()
    ref_k, _ = gather_kv(layout, pool, 2, seq, meta.block_table)
    errors = {}
    for rounding, dtype in ((1, torch.bfloat16), (0, torch.float32)):  # the kernel rounds to the table's dtype, or not
        layout.rope.dtype = dtype
        keys, _ = kernel.dense(layout, pool, 2, seq, table, kernel._layer(layout.layers[2], layout.dtype))
        errors[rounding] = (keys - ref_k).abs().mean() / ref_k.abs().mean()
    assert errors[1] < 1e-4, errors
    from kvpack.kernels import cpu

    if cpu.kernel_isa() == "AVX512":  # the channel-major path composes, so its rounding is what matches
        assert errors[1] < errors[0] / 4, errors
    else:  # AVX2: the token-major tiles read the rounded rows themselves
        assert abs(errors[0] - errors[1]) <= 1e-3 * errors[1], errors


def test_compiled_equals_torch_without_split_rope_tables(monkeypatch):
    """Where the RoPE table can neither be split nor read channel-major, the token-major tiles rotate every key (same
    output)."""
    monkeypatch.setattr(kernel, "split_tables", lambda cos, sin: None)
    monkeypatch.setattr(kernel, "channel_major", lambda cos, sin: None)
    layout = make_layout("kvpack-3bit", torch.float32)
    layout.rope = rope_table()  # a fresh table: its split tables are built (here: refused) on first use
    compare(layout, LENS, NEW, seed=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_bytes", [0, 1 << 30])
def test_compiled_equals_torch_composed_or_read_rope(monkeypatch, dtype, table_bytes):
    """The channel-major path's cos/sin composed from the split tables (a table over CHANNEL_MAJOR_ROPE_BYTES) or read
    from the channel-major table: the same output as the torch reference."""
    monkeypatch.setattr(kernel, "CHANNEL_MAJOR_ROPE_BYTES", table_bytes)
    layout = make_layout("kvpack-3bit", dtype)
    layout.rope = rope_table(dtype=dtype)  # fresh: its tables are built under this limit
    compare(layout, LENS, NEW, seed=10)


def test_channel_major_rope_layout():
    """channel_major(cos, sin)[m] holds rows 16m..16m+15 channel after channel: cos of the first half's channels, then
    their sin, 16 positions a line; the last block is padded with the last row; larger tables are refused."""
    rope = rope_table(40)
    half = rope.cos.shape[1] // 2
    cm = kernel.channel_major(rope.cos, rope.sin)
    assert cm.shape == (3, 2 * half, 16)
    for position in (0, 15, 16, 39, 47):
        row = min(position, 39)
        torch.testing.assert_close(cm[position // 16, :half, position % 16], rope.cos[row, :half], rtol=0, atol=0)
        torch.testing.assert_close(cm[position // 16, half:, position % 16], rope.sin[row, :half], rtol=0, atol=0)
    big = rope_table(kernel.CHANNEL_MAJOR_ROPE_BYTES // (4 * rope.cos.shape[1]) + 1)
    assert kernel.channel_major(big.cos, big.sin) is None


@pytest.mark.parametrize("side", ["keys", "values"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad,error", [(float("nan"), NonFiniteError), (float("inf"), NonFiniteError),
                                       (1e5, ActivationRangeError)])
def test_write_refuses_what_the_pages_cannot_hold(bad, error, dtype, side):
    """A NaN, an inf or an activation beyond fp16's range (ranges and outliers are stored in fp16) in the keys or the
    values is refused with the layer and the tensor named, by the compiled writer (which takes the peaks in its own
    pass over the model's dtype) and the torch one, and nothing is written."""
    layout = make_layout("kvpack-3bit", dtype)
    pool = make_pool(layout)
    g = torch.Generator().manual_seed(5)
    k = keys_like(layout, 4, 8, g).to(dtype)
    v = torch.randn(8, HEADS, DIM, generator=g).to(dtype)
    (k if side == "keys" else v)[3, 1, 7] = bad
    before = pool.slots[4].clone()
    for compiled in (True, False):
        with pytest.raises(error, match=f"layer 4's {side}"):
            write_tokens(layout, pool, 4, k, v, torch.arange(8), torch.arange(8), compiled=compiled)
    assert torch.equal(pool.slots[4], before)
