"""kvpack's LMCache serde: the chunk codec on plain tensors, then the real lmcache classes (skipped without lmcache)."""
from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.hf.rope import apply_rope
from kvpack.integrations.lmcache import ChunkCodec, ChunkFormatError, SerdeConfigError
from kvpack.integrations.lmcache.format import read_prefix
from kvpack.integrations.lmcache.rope import RopeSpec

H, D, L, T = 2, 16, 2, 32  # tiny Llama of conftest: 2 KV heads, head_dim 16, 2 layers
THETA = 10000.0


@pytest.fixture(scope="module")
def kvquant_dirs(tmp_path_factory):
    """kvquant-4bit-1pct (pre-RoPE) and its post-RoPE variant calibrated on the tiny random Llama."""
    import kvpack

    g = torch.Generator().manual_seed(0)
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (1200,), generator=g)))
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    dirs = {}
    for method in ("kvquant-4bit-1pct", "kvquant-4bit-1pct:post-rope"):
        recipe = kvpack.calibrate(model, tok, method, data=str(text), windows=2, seqlen=64, progress=False)
        dirs[method] = recipe.save(tmp_path_factory.mktemp("recipe"))
    return dirs


@pytest.fixture(scope="module")
def tiny_kv():
    """The tiny Llama's own KV cache of 2T tokens as two KV_2LTD chunks (float32, post-RoPE keys):
    positions 0..T-1 (with the attention sink) and T..2T-1."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 100, (1, 2 * T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    k = torch.stack([cache.layers[i].keys[0] for i in range(L)])  # [L, H, 2T, D]
    v = torch.stack([cache.layers[i].values[0] for i in range(L)])
    kv = torch.stack([k, v]).transpose(2, 3).reshape(2, L, 2 * T, H * D)
    return kv[:, :, :T].contiguous(), kv[:, :, T:].contiguous()


def kv_chunk(dtype=torch.bfloat16, layers=L, tokens=T, seed=0) -> torch.Tensor:
    """A KV_2LTD chunk [2, layers, tokens, H * D] with a few large channels, like real keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, layers, tokens, H * D, generator=g) * torch.linspace(0.5, 3.0, H * D)
    return x.to(dtype)


def roundtrip(codec: ChunkCodec, groups, positions=None):
    size = codec.max_nbytes([g.shape for g in groups], [g.dtype for g in groups])
    buf = torch.zeros(size + 7, dtype=torch.uint8)
    written = codec.encode_into(groups, positions, buf)
    out = [torch.zeros_like(g) for g in groups]
    codec.decode_from(buf, out)
    return out, written, size, buf


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kv_2ltd_roundtrip_each_dtype(dtype):
    codec = ChunkCodec.from_kwargs({"method": "int4:key-channel", "head_dim": D})
    x = kv_chunk(dtype)
    (y,), written, size, _ = roundtrip(codec, [x])
    assert written == size and y.dtype == dtype
    assert rel(y[0], x[0]) < 0.12 and rel(y[1], x[1]) < 0.12
    assert written < 0.4 * x.numel() * 2  # 4-bit codes, fp16 scales and the frame of a tiny chunk: < 0.4x bf16


def test_fused_layout_matches_split_layout():
    codec = ChunkCodec.from_kwargs({"method": "int4:key-channel", "head_dim": D})
    x = kv_chunk()
    # fused: [layers, tokens, heads * (K | V)] per head
    fused = torch.stack([x[0].view(L, T, H, D), x[1].view(L, T, H, D)], dim=3).reshape(L, T, H * 2 * D)
    (y,), *_ = roundtrip(codec, [x])
    (yf,), *_ = roundtrip(codec, [fused])
    back = yf.view(L, T, H, 2, D)
    assert torch.equal(back[:, :, :, 0].reshape(L, T, H * D), y[0])
    assert torch.equal(back[:, :, :, 1].reshape(L, T, H * D), y[1])


def test_multi_group_chunk(kvquant_dirs, tiny_kv):
    """Two groups (say a hybrid model's two layer groups), each its own dtype; layers map to the recipe's."""
    d = kvquant_dirs["kvquant-4bit-1pct:post-rope"]
    codec = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct:post-rope", "recipe": str(d)})
    x = tiny_kv[1]
    groups = [x[:, :1].to(torch.bfloat16).contiguous(), x[:, 1:].to(torch.float16).contiguous()]
    out, written, size, _ = roundtrip(codec, groups)
    assert written == size and [o.dtype for o in out] == [torch.bfloat16, torch.float16]
    assert rel(torch.cat([o.float() for o in out], 1), x) < 0.1
    swapped = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct:post-rope", "recipe": str(d), "group_layers": [[1], [0]]})
    out_swapped, *_ = roundtrip(swapped, groups)
    assert not torch.equal(out_swapped[0], out[0])  # layer 1's codecs on group 0 give other bits
    with pytest.raises(SerdeConfigError, match="group_layers"):
        roundtrip(codec, [groups[0]])  # one layer of a two-layer recipe: the mapping must be given


def rotated_chunk(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(post-RoPE chunk, pre-RoPE keys [L, H, T, D]) with keys that have per-channel structure before RoPE."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(L, H, T, D, generator=g) * 0.3 + torch.linspace(-2, 2, D)
    cos, sin = RopeSpec(THETA, D).cos_sin(positions)
    post = apply_rope(pre, cos, sin)
    x = kv_chunk(torch.float32)
    x[0] = post.transpose(1, 2).reshape(L, T, H * D)
    return x.to(torch.bfloat16), pre


def test_pre_rope_with_positions_beats_post_rope_storage():
    positions = torch.arange(1000, 1000 + T)
    x, _ = rotated_chunk(positions)
    pre = ChunkCodec.from_kwargs({"method": "int3:pre-rope:key-channel", "head_dim": D, "rope_theta": THETA})
    post = ChunkCodec.from_kwargs({"method": "int3:key-channel", "head_dim": D})
    (y_pre,), *_ = roundtrip(pre, [x], positions)
    (y_post,), *_ = roundtrip(post, [x])
    assert rel(y_pre[0], x[0]) < 0.5 * rel(y_post[0], x[0])  # keys keep their channel structure only before RoPE
    assert torch.equal(y_pre[1], y_post[1])  # values do not depend on positions
    other_theta = ChunkCodec.from_kwargs({"method": "int3:pre-rope:key-channel", "head_dim": D, "rope_theta": 500000.0})
    _, _, _, buf = roundtrip(pre, [x], positions)
    with pytest.raises(ChunkFormatError, match="RoPE"):
        other_theta.decode_from(buf, [torch.zeros_like(x)])


def test_pre_rope_without_positions_uses_fallback_or_refuses(kvquant_dirs, tiny_kv):
    pre, post = kvquant_dirs["kvquant-4bit-1pct"], kvquant_dirs["kvquant-4bit-1pct:post-rope"]
    x = tiny_kv[1].to(torch.bfloat16)
    alone = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct", "recipe": str(pre), "rope_theta": THETA})
    with pytest.raises(SerdeConfigError, match="cached_positions"):
        roundtrip(alone, [x])
    both = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct", "recipe": str(pre), "rope_theta": THETA,
                                   "fallback_method": "kvquant-4bit-1pct:post-rope", "fallback_recipe": str(post)})
    (y,), written, size, buf = roundtrip(both, [x])
    assert read_prefix(buf)[0]["path"] == "fallback" and read_prefix(buf)[0]["keys"] == "post-rope"
    assert written == size == both.max_nbytes([x.shape], [x.dtype]) and rel(y, x) < 0.1
    (y_pos,), written_pos, _, buf_pos = roundtrip(both, [x], torch.arange(T, 2 * T))
    assert written_pos == size and read_prefix(buf_pos)[0]["keys"] == "pre-rope"  # both paths fill the one fixed size
    assert rel(y_pos, x) < 0.1


def test_worst_case_every_outlier_slot_used(kvquant_dirs, tiny_kv):
    """Inputs far outside the calibrated ranges make every element an outlier candidate: the chunk still fits the
    estimate exactly, every slot is used, and the result stays finite and close where kept."""
    d = kvquant_dirs["kvquant-4bit-1pct:post-rope"]
    codec = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct:post-rope", "recipe": str(d), "outlier_capacity": 0.05})
    x = (tiny_kv[1] * 1000).to(torch.bfloat16)
    (y,), written, size, buf = roundtrip(codec, [x])
    assert written == size and not buf[size:].any()
    # key ranges are fixed at calibration, so every key element is a candidate and each key block fills all its
    # slots; value ranges are per token (online), so value blocks hold their usual few outliers per token
    assert codec.stats["full_blocks"] == L and codec.stats["kept"] <= codec.stats["capacity"]
    assert codec.stats["candidates"] > codec.stats["capacity"] and torch.isfinite(y.float()).all()
    bound = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct:post-rope", "recipe": str(d), "outlier_capacity": 0.05})
    assert bound.max_nbytes([x.shape], [x.dtype]) == size  # the estimate depends only on the layout


def test_sink_token_stays_exact(kvquant_dirs, tiny_kv):
    d = kvquant_dirs["kvquant-4bit-1pct"]
    codec = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct", "recipe": str(d), "rope_theta": THETA})
    x = tiny_kv[0].to(torch.bfloat16)  # positions 0..T-1: token 0 is the attention sink
    (y,), *_ = roundtrip(codec, [x], torch.arange(T))
    assert codec.primary.sink_tokens == 1
    assert rel(y[1, :, 0], x[1, :, 0]) < 2e-3  # values of position 0: exact fp16
    assert rel(y[0, :, 0], x[0, :, 0]) < 2e-2  # keys of position 0: exact pre-RoPE, rotated back in float32


def test_mismatch_and_damage_are_refused(kvquant_dirs):
    x = kv_chunk()
    writer = ChunkCodec.from_kwargs({"method": "int4:key-channel", "head_dim": D})
    _, _, size, buf = roundtrip(writer, [x])
    out = [torch.zeros_like(x)]
    for kwargs in ({"method": "int3:key-channel", "head_dim": D},
                   {"method": "kvquant-4bit-1pct:post-rope", "recipe": str(kvquant_dirs["kvquant-4bit-1pct:post-rope"])}):
        with pytest.raises(ChunkFormatError, match="written with method"):
            ChunkCodec.from_kwargs(kwargs).decode_from(buf, out)
    with pytest.raises(ChunkFormatError, match="groups"):
        writer.decode_from(buf, [torch.zeros_like(x, dtype=torch.float16)])
    damaged = buf.clone()
    damaged[size // 2] ^= 0x10
    with pytest.raises(ChunkFormatError, match="checksum"):
        writer.decode_from(damaged, out)
    with pytest.raises(ChunkFormatError):
        writer.decode_from(buf[: size // 3], out)
    other = buf.clone()
    other[:4] = torch.tensor(list(b"FP8!"), dtype=torch.uint8)
    with pytest.raises(ChunkFormatError, match="magic"):
        writer.decode_from(other, out)
    newer = buf.clone()
    newer[4] = 99
    with pytest.raises(ChunkFormatError, match="version"):
        writer.decode_from(newer, out)
    assert torch.equal(out[0], torch.zeros_like(x))  # nothing was written by the refused loads


def test_bad_options():
    with pytest.raises(SerdeConfigError, match="unknown"):
        ChunkCodec.from_kwargs({"method": "int4", "head_dim": D, "bits": 3})
    with pytest.raises(SerdeConfigError, match="recipe"):
        ChunkCodec.from_kwargs({"method": "kvquant-3bit-1pct", "head_dim": D})
    with pytest.raises(SerdeConfigError, match="rope_theta"):
        ChunkCodec.from_kwargs({"method": "int4:pre-rope", "head_dim": D})
    codec = ChunkCodec.from_kwargs({"method": "int4", "head_dim": 24})
    with pytest.raises(SerdeConfigError, match="head_dim"):
        codec.max_nbytes([(2, L, T, H * D)], [torch.bfloat16])


# ----------------------------------------------------------------------------------------- real lmcache
def lmcache_or_skip():
    try:
        import lmcache.v1.distributed.serde  # noqa: F401
    except Exception as exc:  # ImportError, or a dependency lmcache needs failing on import
        pytest.skip(f"lmcache cannot be imported here ({type(exc).__name__}: {exc}); install it with `make setup`")


def memory_obj(t: torch.Tensor, positions=None, shapes=None, dtypes=None):
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    fmt = MemoryFormat.BINARY if t.dtype == torch.uint8 else MemoryFormat.KV_2LTD
    raw = t.contiguous().reshape(-1).view(torch.uint8).clone()
    meta = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0, phy_size=raw.numel(), ref_count=1, fmt=fmt,
                             cached_positions=positions, shapes=shapes or [t.shape], dtypes=dtypes or [t.dtype])
    return TensorMemoryObj(raw, meta, None)


def test_registered_processor_roundtrip_next_to_fp8():
    lmcache_or_skip()
    import kvpack.integrations.lmcache as kvpack_lmcache
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor, get_registered_serde_types

    kvpack_lmcache.register()
    kvpack_lmcache.register()  # idempotent
    assert "kvpack" in get_registered_serde_types()
    x = (torch.randn(2, 2, 256, 128) * torch.linspace(0.5, 3.0, 128)).to(torch.bfloat16)  # head_dim 64, like SmolLM2
    key = ObjectKey(b"\x01" * 16, "tiny", 0)
    errors = {}
    for name, kwargs in (("kvpack", {"method": "int4:key-channel", "head_dim": 64}), ("fp8", {})):
        proc = create_serde_processor(SerdeConfig(type=name, kwargs=kwargs))
        size = proc.estimate_serialized_size(MemoryLayoutDesc([x.shape], [x.dtype]))
        buf, out = memory_obj(torch.zeros(size, dtype=torch.uint8)), memory_obj(torch.zeros_like(x))
        task = proc.submit_serialize([memory_obj(x)], [buf], [key])
        assert _poll(lambda: proc.query_serialize_result(task)) is True
        assert buf.get_size() == size  # the processor narrowed the buffer to what serialize returned
        task = proc.submit_deserialize([buf], [out], [key])
        assert _poll(lambda: proc.query_deserialize_result(task)) is True
        errors[name] = (size, rel(out.tensor, x))
        proc.close()
    assert errors["kvpack"][0] < 0.6 * errors["fp8"][0]  # 4-bit codes (+ scales) vs 1 byte per element
    assert errors["kvpack"][1] < 0.12


def test_damaged_chunk_fails_the_lmcache_task():
    lmcache_or_skip()
    import kvpack.integrations.lmcache as kvpack_lmcache
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor

    kvpack_lmcache.register()
    proc = create_serde_processor(SerdeConfig(type="kvpack", kwargs={"method": "int4:key-channel", "head_dim": D}))
    x, key = kv_chunk(), ObjectKey(b"\x02" * 16, "tiny", 0)
    size = proc.estimate_serialized_size(MemoryLayoutDesc([x.shape], [x.dtype]))
    buf = memory_obj(torch.zeros(size, dtype=torch.uint8))
    task = proc.submit_serialize([memory_obj(x)], [buf], [key])
    assert _poll(lambda: proc.query_serialize_result(task)) is True
    buf.tensor[size - 40] ^= 1
    task = proc.submit_deserialize([buf], [memory_obj(torch.zeros_like(x))], [key])
    assert _poll(lambda: proc.query_deserialize_result(task)) is False  # LMCache sees a failed load, never wrong KV
    proc.close()


def test_multi_group_memory_obj_through_serializer(kvquant_dirs, tiny_kv):
    lmcache_or_skip()
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from kvpack.integrations.lmcache import KVPackDeserializer, KVPackSerializer

    codec = ChunkCodec.from_kwargs({"method": "kvquant-4bit-1pct:post-rope", "recipe": str(kvquant_dirs["kvquant-4bit-1pct:post-rope"])})
    x = tiny_kv[1]
    g0, g1 = x[:, :1].to(torch.bfloat16).contiguous(), x[:, 1:].to(torch.float16).contiguous()
    raw = torch.cat([g0.reshape(-1).view(torch.uint8), g1.reshape(-1).view(torch.uint8)])
    src = memory_obj(raw.view(torch.bfloat16).view(-1), shapes=[g0.shape, g1.shape], dtypes=[g0.dtype, g1.dtype])
    size = KVPackSerializer(codec).estimate_serialized_size(MemoryLayoutDesc([g0.shape, g1.shape], [g0.dtype, g1.dtype]))
    buf = memory_obj(torch.zeros(size, dtype=torch.uint8))
    key = ObjectKey(b"\x03" * 16, "tiny", 0)
    assert KVPackSerializer(codec).serialize(src, buf, key) == size
    dst = memory_obj(torch.zeros_like(raw).view(torch.bfloat16).view(-1), shapes=[g0.shape, g1.shape], dtypes=[g0.dtype, g1.dtype])
    KVPackDeserializer(codec).deserialize(buf, dst, key)
    back = torch.cat([dst.get_tensor(0).float(), dst.get_tensor(1).float()], 1)
    assert rel(back, x) < 0.1


def test_fs_l2_adapter_store_and_load(tmp_path):
    """The real `fs` L2 adapter with the serde wrapper, built from its JSON spec as LMCache's storage manager does."""
    lmcache_or_skip()
    import kvpack.integrations.lmcache as kvpack_lmcache
    from lmcache.v1.distributed.api import ObjectKey
    from lmcache.v1.distributed.config import L1ManagerConfig, L1MemoryManagerConfig
    from lmcache.v1.distributed.l1_manager import L1Manager
    from lmcache.v1.distributed.l2_adapters import config as l2_config
    from lmcache.v1.distributed.l2_adapters import create_l2_adapter
    from lmcache.v1.distributed.l2_adapters.serde_wrapper import SerdeL2AdapterWrapper
    from lmcache.v1.distributed.serde import create_serde_processor

    kvpack_lmcache.register()
    spec = {"type": "fs", "base_path": str(tmp_path),
            "serde": {"type": "kvpack", "method": "int4:pre-rope:key-channel", "head_dim": D, "rope_theta": THETA}}
    args = argparse.Namespace(**{l2_config._L2_ADAPTER_ARG_DEST: [json.dumps(spec)]})
    config = l2_config.parse_args_to_l2_adapters_config(args).adapters[0]
    l1 = L1Manager(L1ManagerConfig(L1MemoryManagerConfig(size_in_bytes=16 << 20, use_lazy=False, shm_name="")))
    adapter = SerdeL2AdapterWrapper(create_l2_adapter(config, l1.get_l1_memory_desc()), create_serde_processor(config.serde_config), l1)
    positions = torch.arange(T, 2 * T)
    x, _ = rotated_chunk(positions)
    key = ObjectKey(b"\x04" * 16, "tiny", 0)
    task = adapter.submit_store_task([key], [memory_obj(x, positions)])
    assert _poll(lambda: adapter.pop_completed_store_tasks().get(task)) >= 0  # L2StoreResult: bytes, or -1 on failure
    (stored,) = list(tmp_path.glob("*.data"))
    out = memory_obj(torch.zeros_like(x))
    task = adapter.submit_load_task([key], [out])
    assert _poll(lambda: adapter.query_load_result(task)).get_indices_list() == [0]
    adapter.close()
    assert stored.stat().st_size < 0.4 * x.numel() * 2 and rel(out.tensor, x) < 0.12


def _poll(fn, timeout: float = 20.0):
    start = time.time()
    while time.time() - start < timeout:
        result = fn()
        if result is not None:
            return result
        time.sleep(0.005)
    raise TimeoutError("LMCache task did not finish")


def test_missing_lmcache_names_the_install(monkeypatch):
    import builtins
    import sys

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("lmcache"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "kvpack.integrations.lmcache.serde", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    import kvpack.integrations.lmcache as kvpack_lmcache

    with pytest.raises(ImportError, match="pip install"):
        kvpack_lmcache.register()
