"""What a mixed-width preset holds, and nothing more: each channel's 2**width fp16 levels (no padding to the widest
width), prompts and decode steps in one run of one-token blocks (one set of buffers and bookkeeping per layer's
keys or values), read by the kernels as one block, with under 0.4% spare capacity and a few KB of Python objects per
layer."""
import pytest
import torch
from conftest import tiny_mixed_recipe

from kvpack.cache.cache import CompressedCache
from kvpack.cache.memory import held_storages, model_state, python_bytes
from kvpack.codecs.nuq import PAD, NuqCodec
from kvpack.hf.attention import cache_kwargs
from kvpack.kernels import cpu, dispatch
from kvpack.kernels.layout import mixed_view

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, DIM = 2, 16
WIDTHS = torch.tensor([3] * 8 + [2] * 16 + [5] * 8)


def _codec(axis: str, span: str = "all", outliers: float = 0.0) -> NuqCodec:
    g = torch.Generator().manual_seed(0)
    levels = torch.rand(HEADS * DIM, 32, generator=g) * 2 - 1
    ranges = {} if axis == "token" else {"zero": torch.zeros(HEADS, DIM), "scale": torch.ones(HEADS, DIM)}
    return NuqCodec(levels, axis, HEADS, DIM, outlier_frac=outliers, span=span, channel_bits=WIDTHS, **ranges)


def test_levels_held_per_channel_width():
    codec = _codec("channel")
    widths = 1 << WIDTHS.long()
    assert codec.level_data.numel() == int(widths.sum())  # no padding to 2**5 levels per channel
    padded = codec.levels
    assert padded.shape == (HEADS * DIM, 32)
    used = torch.arange(32) < widths[:, None]
    assert torch.all(padded[~used] == PAD)
    assert torch.equal(padded[used], codec.level_data)
    assert all(torch.all(row[:w][1:] >= row[:w][:-1]) for row, w in zip(padded, widths.tolist()))  # sorted
    again = NuqCodec.from_state(*codec.state())  # recipe files keep the padded table: the same codec comes back
    assert torch.equal(again.level_data, codec.level_data)
    # what the codec holds is what the quality table counts for it
    assert sum(held_storages(codec).values()) == codec.shared_nbytes()


@pytest.mark.parametrize("axis,outliers", [("channel", 0.0), ("channel", 0.05), ("token", 0.05)])
def test_split_tokens_is_the_same_storage(axis, outliers):
    codec = _codec(axis, outliers=outliers)
    x = torch.randn(1, HEADS, 11, DIM, generator=torch.Generator().manual_seed(1)) * 2
    enc = codec.encode(x)
    split = codec.split_tokens(enc)
    assert split is not None and split.shape == (11, HEADS, 1, DIM)
    for name, t in enc.tensors.items():  # only shapes change
        assert split.tensors[name].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    decoded = codec.decode(split)  # [11, H, 1, D]
    torch.testing.assert_close(decoded.squeeze(2).transpose(0, 1).unsqueeze(0), codec.decode(enc), atol=0, rtol=0)
    assert codec.split_tokens(codec.encode(x.repeat(2, 1, 1, 1))) is None  # batch 2: blocks are batch-major
    assert _codec("token", span="head").split_tokens(_codec("token", span="head").encode(x)) is None  # per-head ranges


@torch.no_grad()
def test_prompt_and_decode_steps_share_one_run(mixed_calib_text):
    model, tok, recipe = tiny_mixed_recipe("kvquant-3bit-1pct:alloc-global", mixed_calib_text)
    assert all(c.channel_bits is not None for c in recipe.key_codecs)
    ids = torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache(model, recipe)
    model(ids[:, :40], **cache_kwargs(cache))
    for t in range(40, 300):
        model(ids[:, t:t + 1], **cache_kwargs(cache))
    for layer in cache.layers:
        for stream in (layer.k, layer.v):
            (run,) = stream.body.runs
            assert run.block_shape[2] == 1 and run.count == stream.body.tokens == 300 - stream.head_len
            for name, buf in run.buffers.items():  # spare capacity under 0.4% (+ one block's rows)
                spare = buf.shape[0] - run.used(name)
                assert spare <= run.used(name) // 256 + run.used(name) // run.count + 1, name
            if cpu.available():
                view = mixed_view(run, stream.codec)
                assert view is not None and view.nblk == 1 and view.tokens == run.count  # read as one block
        if cpu.available():
            q = torch.randn(1, model.config.num_attention_heads, 1, 16, generator=torch.Generator().manual_seed(2))
            paths = []
            ref = dispatch.layer_attention(layer, q, backend="torch", rope=cache.packed.rope)
            got = dispatch.layer_attention(layer, q, backend="auto", rope=cache.packed.rope, paths=paths)
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            assert paths == [("layer", "cpu")]


@torch.no_grad()
def test_kernel_arguments_follow_decode_steps(mixed_calib_text):
    """A run read as one growing block keeps its kernel arguments across decode steps (token counts and buffer
    addresses brought up to date, also when a buffer moves to grow): every step reads what the torch reference
    reads, and after a crop (an edit) the arguments are rebuilt."""
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    model, tok, recipe = tiny_mixed_recipe("kvquant-3bit-1pct:alloc-global", mixed_calib_text)
    ids = torch.randint(3, 120, (1, 120), generator=torch.Generator().manual_seed(4))
    cache = CompressedCache(model, recipe)
    model(ids[:, :20], **cache_kwargs(cache))
    q = torch.randn(1, model.config.num_attention_heads, 1, 16, generator=torch.Generator().manual_seed(5))
    layer = cache.layers[1]
    moved = 0
    for t in range(20, 120):
        before = {n: b.data_ptr() for n, b in layer.v.body.runs[0].buffers.items()}
        model(ids[:, t:t + 1], **cache_kwargs(cache))
        moved += any(b.data_ptr() != before[n] for n, b in layer.v.body.runs[0].buffers.items())
        if t == 100:
            cache.crop(90)
        ref = dispatch.layer_attention(layer, q, backend="torch", rope=cache.packed.rope)
        got = dispatch.layer_attention(layer, q, backend="auto", rope=cache.packed.rope)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert moved > 0  # buffers grew along the way
    assert layer.v.body.runs[0].__dict__["_kvpack_args"][-1]  # still read as one growing block


@torch.no_grad()
def test_python_objects_per_layer_are_few(mixed_calib_text):
    """After a prompt and 100 decode steps, a layer's Python objects (the layer, its streams, runs, their bookkeeping
    and kernel arguments; what runs share, such as tensor names and block shapes, counted once) stay within
    128 B per buffer + 2,304 B per stream."""
    model, tok, recipe = tiny_mixed_recipe("kvquant-3bit-1pct:alloc-global", mixed_calib_text)
    ids = torch.randint(3, 120, (1, 120), generator=torch.Generator().manual_seed(4))
    cache = CompressedCache(model, recipe)
    model(ids[:, :20], **cache_kwargs(cache))
    for t in range(20, 120):
        model(ids[:, t:t + 1], **cache_kwargs(cache))
    stop, seen = (model, *model_state(cache)), set()
    python_bytes(cache.layers[0], seen, stop)  # what layers share is counted here
    for layer in cache.layers[1:]:
        streams = [layer.k, layer.v]
        buffers = sum(len(r.buffers) for s in streams for r in s.body.runs)
        assert python_bytes(layer, seen, stop) <= 128 * buffers + 2304 * len(streams)
