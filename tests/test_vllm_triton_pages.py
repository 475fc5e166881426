"""kvpack's Triton page kernels (the vLLM backend's CUDA read path) under Triton's interpreter on the CPU, against the
torch read path (`read.attend`: gather, decode, attend) over the same pages.

Pages are written by the real write path (`write.write_tokens`) from layouts of the shipped recipes (kvpack-3bit:
mixed widths, per-channel codebooks, pre-RoPE, a sink, the per-page key-outlier pool; kvquant-3bit-1pct: one
codebook, per-token key outlier slots, bf16 sinks) and the lossless fp16 method; three requests through one block
table, decode and chunked-prefill queries, GQA, split-K with the merge and a single split. No vLLM needed.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace

from triton_interpreter import use_interpreter

use_interpreter()  # before triton decorates the kernels

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

for _name in ("kvpack.integrations.vllm.triton_pages", "kvpack.integrations.vllm.cuda_read"):  # decorate again
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
from kvpack.integrations.vllm import cuda_read, triton_pages  # noqa: E402
from kvpack.integrations.vllm.config import KvpackVllmConfig  # noqa: E402
from kvpack.integrations.vllm.layout import EngineLayout  # noqa: E402
from kvpack.integrations.vllm.pages import PagePool  # noqa: E402
from kvpack.integrations.vllm.read import attend  # noqa: E402
from kvpack.integrations.vllm.rope import RopeTable  # noqa: E402
from kvpack.integrations.vllm.slots import LayerSlots, nuq_part, raw_part  # noqa: E402
from kvpack.integrations.vllm.write import write_tokens  # noqa: E402
from kvpack.recipes.bundled import SHIPPED_DIR  # noqa: E402
from kvpack.recipes.recipe import Recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 16
LAYERS = 2  # the first layers of a recipe: enough for per-layer tables
HEADS, DIM = 3, 64  # the shipped recipes' model (SmolLM2-135M): 3 KV heads of 64 channels
LENS = [40, 23, 5]  # tokens cached per request after the step
TABLE = torch.tensor([[3, 7, 1, 0], [5, 2, 0, 0], [4, 0, 0, 0]])  # block table (request 2: one page)


def rope_table(dim: int, max_len: int = 256) -> RopeTable:
    """A RopeTable (rotate_half, base 10000) without a model config."""
    rope = object.__new__(RopeTable)
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(max_len).float()[:, None] * inv[None, :]
    emb = torch.cat([angles, angles], 1)
    rope.cos, rope.sin = emb.cos(), emb.sin()
    return rope


def make_layout(kind: str) -> EngineLayout:
    if kind == "fp16":
        layers = [LayerSlots(raw_part(HEADS, DIM, torch.float16), raw_part(HEADS, DIM, torch.float16), 0,
                             torch.float16)] * LAYERS
        return EngineLayout(KvpackVllmConfig(method="fp16"), None, layers, torch.float16, None, BLOCK)
    name, dtype, outliers = {"kvpack": ("kvpack-3bit", torch.float32, "page"),
                             "kvquant": ("kvquant-3bit-1pct", torch.bfloat16, "token")}[kind]
    recipe = Recipe.load(SHIPPED_DIR / name)
    layers = []
    for kc, vc in list(zip(recipe.key_codecs, recipe.value_codecs))[:LAYERS]:
        pooled = outliers == "page"
        layers.append(LayerSlots(nuq_part(kc, 0 if pooled else 4), nuq_part(vc, None), recipe.settings.sink_tokens,
                                 dtype, 4 * BLOCK if pooled else 0))
    config = KvpackVllmConfig(method=name, key_outliers=outliers)
    return EngineLayout(config, recipe, layers, dtype, rope_table(DIM), BLOCK)


def fill(layout: EngineLayout, layer: int, q_lens: list[int], seed: int = 0, new_tokens: bool = True):
    """Pages of LENS tokens per request written as vLLM would: prompts in chunks, then decode steps; the last
    q_lens tokens of each request are written last (the step's new tokens). new_tokens=False: those are left out
    and returned as (pool, key, value, slot_mapping, positions) of the step."""
    g = torch.Generator().manual_seed(seed)
    c = layout.page_content_bytes()
    pool = PagePool(torch.zeros(LAYERS * 8 * BLOCK * c, dtype=torch.uint8).view(LAYERS, 8, 1, BLOCK, c)[0], layout.layers)
    new: list[tuple] = []
    for req, (length, q) in enumerate(zip(LENS, q_lens)):
        k = torch.randn(length, HEADS, DIM, generator=g) * 2
        k[torch.rand(length, HEADS, DIM, generator=g) < 0.02] *= 15  # key outliers
        v = torch.randn(length, HEADS, DIM, generator=g)
        cut = length - q
        for a, b in [(0, min(cut, 25)), (min(cut, 25), cut), (cut, length)]:
            if b > a:
                pos = torch.arange(a, b)
                slots = TABLE[req, pos // BLOCK] * BLOCK + pos % BLOCK
                args = (k[a:b].to(layout.dtype), v[a:b].to(layout.dtype), slots, pos)
                if a == cut and not new_tokens:
                    new.append(args)
                else:
                    write_tokens(layout, pool, layer, *args)
    if new_tokens:
        return pool
    return (pool, *(torch.cat(parts) for parts in zip(*new)))


def step(q_lens: list[int]) -> SimpleNamespace:
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    return SimpleNamespace(query_start_loc=qsl, seq_lens=torch.tensor(LENS), block_table=TABLE)


@pytest.mark.parametrize("kind", ["kvpack", "kvquant", "fp16"])
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 7, 5]], ids=["decode", "chunked-prefill"])
def test_page_kernels_match_the_torch_read_path(kind, q_lens):
    layout = make_layout(kind)
    layer = 1
    pool = fill(layout, layer, q_lens)
    if layout.layers[layer].key_pool:  # the pool holds outliers of every page
        counts = pool.pools[layer][:, :2].contiguous().view(torch.int16)
        assert int((counts[[3, 7, 1, 5, 2, 4]] > 0).sum()) == 6
    meta = step(q_lens)
    group = 3
    query = torch.randn(sum(q_lens), HEADS * group, DIM, generator=torch.Generator().manual_seed(5))
    ref = torch.zeros_like(query)
    attend(layout, pool, layer, query, meta, DIM ** -0.5, ref)
    twin = cuda_read.device_layout(layout, query.device)
    for splits in ([None, 3] if q_lens == [1, 1, 1] else [None]):
        out = torch.full_like(query, float("nan"))
        cuda_read.attend(twin, pool, layer, query, meta, DIM ** -0.5, out, splits=splits)
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max() < 1e-3, (kind, q_lens, splits, float((out - ref).abs().max()))


def test_forward_writes_the_step_then_attends():
    """cuda_read.forward (the backend's CUDA step, here on CPU tensors): the device twin's write path stores the
    same bytes as write_tokens, then the kernels attend over them, padding slots (-1) skipped."""
    layout = make_layout("kvpack")
    q_lens = [1, 7, 5]
    full = fill(layout, 0, q_lens)
    pool, key, value, slots, pos = fill(layout, 0, q_lens, new_tokens=False)
    pad = lambda x, v: torch.cat([x, torch.full((2, *x.shape[1:]), v, dtype=x.dtype)])  # noqa: E731
    meta = step(q_lens)
    meta.slot_mapping, meta.positions, meta.num_actual_tokens = pad(slots, -1), pad(pos, 0), 15
    query = torch.randn(15, HEADS * 3, DIM, generator=torch.Generator().manual_seed(2))
    out = torch.zeros_like(query)
    cuda_read.forward(layout, pool, 0, query, pad(key, 0), pad(value, 0), meta, 0.125, out)
    assert torch.equal(pool.slots[0], full.slots[0]) and torch.equal(pool.pools[0], full.pools[0])
    assert torch.equal(pool.sinks[0], full.sinks[0])
    ref = torch.zeros_like(query)
    attend(layout, full, 0, query[:13], meta, 0.125, ref[:13])
    assert (out[:13] - ref[:13]).abs().max() < 1e-3 and torch.isfinite(out).all()


def test_gqa_group_of_one_and_bf16_output():
    layout = make_layout("kvquant")
    pool = fill(layout, 0, [1, 2, 1], seed=3)
    meta = step([1, 2, 1])
    query = torch.randn(4, HEADS, DIM, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ref = torch.zeros(4, HEADS, DIM)
    attend(layout, pool, 0, query, meta, 0.1, ref)
    out = torch.zeros_like(query)
    cuda_read.attend(cuda_read.device_layout(layout, query.device), pool, 0, query, meta, 0.1, out)
    assert (out.float() - ref).abs().max() < 2e-2  # bf16 output rounding


def test_launch_plan_and_refusals():
    shape = triton_pages.plan(requests=4, kv_heads=8, group=4, max_query_len=1, max_seq_len=8192, tokens=4,
                              heads=32, dim=128, bn=32)
    assert shape["BM"] == 16 and shape["BQ"] == 4 and shape["splits"] > 1
    assert shape["split_len"] % 32 == 0 and shape["split_len"] * shape["splits"] >= 8192
    prefill = triton_pages.plan(requests=1, kv_heads=8, group=4, max_query_len=2048, max_seq_len=2048, tokens=2048,
                                heads=32, dim=128, bn=32)
    assert prefill["BM"] == 32 and prefill["qblocks"] == 2048 // 8
    assert triton_pages.tile_tokens(128) == 32 and triton_pages.tile_tokens(48) == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_pages.tile_tokens(8)


COMPILE = """
import json, sys
sys.path.insert(0, "benchmarks")
from kvpack.kernels import triton_decode as td
ok, why = td.aot_available()
if not ok:
    print(json.dumps({"skip": why})); sys.exit(0)
import torch
import triton_compile_report as report
from kvpack.integrations.vllm import triton_pages as tp
layer, pre_rope = report.page_layers(64)["nuq3-pool"]
tables = tp.layer_tables(layer, torch.device("cpu"))
rows = {name: tp.aot_stats(fn, sig, consts, 90, **launch)
        for name, (fn, sig, consts, launch) in tp.aot_configs(tables, 4, 16, pre_rope).items()}
print(json.dumps(rows))
"""


def test_page_kernels_compile_for_sm90_without_spills():
    """The interpreter does not compile: ahead-of-time compile (no GPU; a subprocess without TRITON_INTERPRET)."""
    import json
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in rows:
        pytest.skip(rows["skip"])
    for name, stats in rows.items():
        assert stats["spill_stores"] == 0 and stats["registers"] <= 255, (name, stats)
    assert rows["pages_decode"]["tl_dot"] and rows["pages_prefill"]["tl_dot"]


# ---------------------------------------------------------------------------------------------------- CUDA wiring
def _platform(kind: str, calls: list | None = None):
    class FakePlatform:
        device_name = kind

        def is_cpu(self):
            return kind == "cpu"

        def is_cuda(self):
            return kind == "cuda"

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            calls.append(selected_backend)
            return selected_backend.get_path()

        @classmethod
        def check_and_update_config(cls, vllm_config):
            calls.append("vllm check")

    return FakePlatform()


def test_platforms_accepted_and_refused():
    from kvpack.integrations.vllm.config import KvpackVllmError, check_platform

    cache = lambda n: SimpleNamespace(cache_config=SimpleNamespace(block_size=n))  # noqa: E731
    check_platform(_platform("cpu"), cache(1))
    check_platform(_platform("cuda"), cache(16))
    check_platform(_platform("cuda"), cache(None))  # vLLM picks the default (16) later
    with pytest.raises(KvpackVllmError, match="multiple of 16"):
        check_platform(_platform("cuda"), cache(8))
    for kind in ("rocm", "xpu", "tpu"):
        with pytest.raises(KvpackVllmError, match=f"'{kind}'.*ROCm, XPU and TPU are not implemented"):
            check_platform(_platform(kind), cache(16))


def test_cuda_metadata_is_device_side_with_host_bounds():
    cm = SimpleNamespace(query_start_loc=torch.tensor([0, 1, 8, 13], dtype=torch.int32),
                         query_start_loc_cpu=torch.tensor([0, 1, 8, 13], dtype=torch.int32),
                         seq_lens=torch.tensor(LENS, dtype=torch.int32), num_actual_tokens=15, max_query_len=7,
                         max_seq_len=40, block_table_tensor=TABLE.to(torch.int32), slot_mapping=torch.arange(15))
    fields = cuda_read.metadata_fields(cm)
    expected = torch.cat([torch.tensor([39]), torch.arange(16, 23), torch.arange(0, 5), torch.zeros(2, dtype=torch.long)])
    assert torch.equal(fields["positions"], expected)
    assert (fields["max_query_len"], fields["max_seq_len"]) == (7, 40)
    assert cuda_read.step_bounds(SimpleNamespace(**fields)) == (7, 40)


def test_cuda_platform_selects_kvpack_through_the_custom_backend(monkeypatch):
    """The plug-in on a (fake) CUDA platform: a kvpack engine gets KvpackBackend registered as CUSTOM and selected
    through the platform's own selection; other engines get the platform's choice; the config check builds the
    layout after vLLM's own. (On the real CPU platform: tests/test_vllm_plugin.py.)"""
    pytest.importorskip("vllm")
    import vllm.config
    import vllm.platforms
    from vllm.v1.attention.backends import registry

    from kvpack.integrations.vllm import plugin
    from kvpack.integrations.vllm.backend import KvpackBackend  # imported on the real platform

    calls: list = []
    fake = _platform("cuda", calls)
    monkeypatch.setattr(vllm.platforms, "_current_platform", fake)
    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", {})
    config = SimpleNamespace(additional_config={"kvpack": {"method": "kvpack-3bit"}})
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: config)
    monkeypatch.setattr(plugin, "active_layout", lambda c: SimpleNamespace(describe=lambda: {}))
    monkeypatch.setattr(plugin, "build_layout", lambda c: calls.append("kvpack layout"))
    plugin.register()
    selector = SimpleNamespace(attn_type="decoder")
    assert type(fake).get_attn_backend_cls(None, attn_selector_config=selector) == plugin.BACKEND_PATH
    assert calls == [registry.AttentionBackendEnum.CUSTOM]
    type(fake).check_and_update_config(config)
    assert calls[1:] == ["vllm check", "kvpack layout"]
    config.additional_config = {}
    flash = registry.AttentionBackendEnum.FLASH_ATTN
    assert type(fake).get_attn_backend_cls(flash, attn_selector_config=selector) == flash.get_path()
    type(fake).check_and_update_config(config)
    assert calls[3:] == [flash, "vllm check"]
    assert [s.base for s in KvpackBackend.get_supported_kernel_block_sizes()] == [16]
