"""Baseline codecs: round-trip error bounds, honest bit accounting, saved-state round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs import (
    CodebookCodec,
    Encoded,
    Fp16Codec,
    NormalFloatCodec,
    UniformCodec,
    codec_from_state,
    normal_float_levels,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FP16_EPS = 2.0**-11  # half an fp16 ulp, relative
FP16_TINY = 2.0**-25  # half the smallest fp16 subnormal: absolute rounding near zero
QLORA_NF4 = [
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
]


# --- helpers: statistics per group, computed independently of the codecs -----------------------

def group_view(x: torch.Tensor, axis: str, group: int | None) -> tuple[torch.Tensor, int]:
    """x [..., T, D] -> (view, reduce dim) with one statistic per group."""
    *lead, t, d = x.shape
    if axis == "token":
        g = group or d
        return x.reshape(*lead, t, d // g, g), -1
    g = group or t
    return x.reshape(*lead, t // g, g, d), -2


def n_groups(shape, axis: str, group: int | None) -> int:
    *lead, t, d = shape
    per = t * (d // (group or d)) if axis == "token" else (t // (group or t)) * d
    return math.prod(lead) * per


def error_and_range(x, x_hat, axis, group):
    """(max |x - x_hat| per group, lo, hi) as broadcastable group tensors."""
    view, dim = group_view(x.double(), axis, group)
    err = (view - group_view(x_hat.double(), axis, group)[0]).abs().amax(dim, keepdim=True)
    return err, view.amin(dim, keepdim=True), view.amax(dim, keepdim=True)


@st.composite
def blocks(draw, max_lead=2, max_tokens=12, dims=(8, 16, 24, 32)):
    """A float32 block [*lead, tokens, head_dim] with a group size that divides it, per axis."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_lead))
    t = draw(st.integers(1, max_tokens))
    d = draw(st.sampled_from(dims))
    numel = math.prod(lead) * t * d
    scale = draw(st.sampled_from([2.0**-10, 1.0, 32.0, 1024.0]))
    kind = draw(st.sampled_from(["uniform", "normal", "list", "constant", "outlier"]))
    if kind == "list" and numel > 256:
        kind = "normal"
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "uniform":
        x = (torch.rand(numel, generator=g) * 2 - 1) * scale
    elif kind == "normal":
        x = torch.randn(numel, generator=g) * scale + draw(st.floats(-5, 5)) * scale
    elif kind == "constant":
        x = torch.full((numel,), draw(st.floats(-scale, scale, width=32)))
    elif kind == "outlier":
        x = torch.randn(numel, generator=g) * scale * 1e-2
        x[draw(st.integers(0, numel - 1))] = scale
    else:
        x = torch.tensor(draw(st.lists(st.floats(-scale, scale, width=32, allow_subnormal=False), min_size=numel, max_size=numel)))
    return x.float().reshape(*lead, t, d)


def group_sizes(x: torch.Tensor, axis: str):
    t, d = x.shape[-2:]
    n = t if axis == "channel" else d
    return st.sampled_from([None] + [s for s in (1, 2, 4, 8, 16, 32) if n % s == 0 and s <= n])


# --- fp16 ----------------------------------------------------------------------------------------

@given(blocks())
@settings(max_examples=60, deadline=None)
def test_fp16_round_trip_and_bits(x):
    codec = Fp16Codec()
    enc = codec.encode(x)
    assert enc.bits_per_element() == 16.0
    assert enc.nbytes() == 2 * x.numel()
    x_hat = codec.decode(enc)
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape
    assert ((x_hat - x).abs() <= x.abs() * FP16_EPS + 2.0**-25).all()
    assert torch.equal(x_hat, x.half().float())


# --- uniform (intN) ------------------------------------------------------------------------------

@st.composite
def uniform_cases(draw):
    x = draw(blocks())
    axis = draw(st.sampled_from(["token", "channel"]))
    group = draw(group_sizes(x, axis))
    bits = draw(st.integers(2, 8))
    return x, UniformCodec(bits, axis, group)


@given(uniform_cases())
@settings(max_examples=150, deadline=None)
def test_uniform_error_bound(case):
    x, codec = case
    enc = codec.encode(x)
    x_hat = codec.decode(enc)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    levels = 2**codec.bits - 1
    err, lo, hi = error_and_range(x, x_hat, codec.axis, codec.group_size)
    step = (hi - lo) / levels
    # half a step, plus what rounding the stored min and step to fp16 can add (the step error is
    # multiplied by up to `levels` codes), plus float32 arithmetic
    mag = torch.maximum(lo.abs(), hi.abs())
    # (FP16_TINY: absolute rounding in fp16's subnormal range, for the min and for each step)
    bound = step * (0.5 + (levels + 1) * FP16_EPS) + 2 * mag * FP16_EPS + 1e-6 * mag + (levels + 2) * FP16_TINY
    assert (err <= bound).all(), float((err - bound).max())
    # constant groups are reconstructed up to the fp16 rounding of their value
    const = (hi == lo)
    assert (err[const] <= mag[const] * FP16_EPS * 1.01 + FP16_TINY).all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis,group", [("token", None), ("token", 32), ("token", 8), ("channel", None), ("channel", 32), ("channel", 16)])
def test_uniform_error_is_about_half_a_step(bits, axis, group):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 64, 64, generator=g)
    codec = UniformCodec(bits, axis, group)
    x_hat = codec.decode(codec.encode(x))
    err, lo, hi = error_and_range(x, x_hat, axis, group)
    step = (hi - lo) / (2**bits - 1)
    assert (err <= step * 0.5001 + 2 * torch.maximum(lo.abs(), hi.abs()) * FP16_EPS).all()
    # not a trivially loose codec: the error really uses most of half a step somewhere
    assert (err / step).max() > 0.4
    # more bits -> smaller error
    if bits < 8:
        finer = UniformCodec(bits + 1, axis, group)
        assert (finer.decode(finer.encode(x)) - x).abs().mean() < (x_hat - x).abs().mean()


def test_uniform_hits_min_and_max_exactly_when_representable():
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])  # 4 values, int2 has exactly 4 levels
    codec = UniformCodec(2, "token")
    assert torch.equal(codec.decode(codec.encode(x)), x)


@given(uniform_cases())
@settings(max_examples=80, deadline=None)
def test_uniform_bits_accounting(case):
    x, codec = case
    enc = codec.encode(x)
    *lead, t, d = x.shape
    rows = math.prod(lead)
    code_bytes = rows * math.ceil(t * d * codec.bits / 8)
    expected_bits = 8 * code_bytes + 32 * n_groups(x.shape, codec.axis, codec.group_size)  # fp16 min + fp16 step
    assert 8 * enc.nbytes() == expected_bits
    assert enc.bits_per_element() == pytest.approx(expected_bits / x.numel(), rel=1e-12)
    assert codec.shared_nbytes() == 0
    assert enc.shape == tuple(x.shape)


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_bits_per_element_by_hand(bits):
    x = torch.randn(1, 2, 256, 64)
    assert UniformCodec(bits, "token").encode(x).bits_per_element() == bits + 32 / 64
    assert UniformCodec(bits, "token", 32).encode(x).bits_per_element() == bits + 32 / 32
    assert UniformCodec(bits, "channel").encode(x).bits_per_element() == bits + 32 / 256
    assert UniformCodec(bits, "channel", 32).encode(x).bits_per_element() == bits + 32 / 32


def test_uniform_codes_are_really_packed():
    x = torch.randn(1, 1, 64, 64)
    enc = UniformCodec(3, "token").encode(x)
    codes = [v for v in enc.tensors.values() if v.dtype == torch.uint8]
    assert len(codes) == 1 and codes[0].numel() == 64 * 64 * 3 // 8


@pytest.mark.parametrize("axis,shape,group", [("token", (4, 30), 8), ("channel", (10, 16), 4)])
def test_uniform_group_must_divide(axis, shape, group):
    with pytest.raises(ValueError, match="divisible|whole number"):
        UniformCodec(4, axis, group).encode(torch.randn(*shape))


@pytest.mark.parametrize("bits", [0, 9, 16, -2, 2.5, "4"])
def test_uniform_bad_bits(bits):
    with pytest.raises(ValueError, match="bit width"):
        UniformCodec(bits)


def test_bad_axis():
    with pytest.raises(ValueError, match="axis"):
        UniformCodec(4, "head")
    with pytest.raises(ValueError, match="axis"):
        NormalFloatCodec(4, "tokens")


# --- NormalFloat and codebooks ---------------------------------------------------------------------

def test_nf4_matches_qlora_table():
    levels = normal_float_levels(4)
    assert levels.shape == (16,)
    assert torch.allclose(levels, torch.tensor(QLORA_NF4), atol=1e-4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_normal_float_levels_shape(bits):
    levels = normal_float_levels(bits)
    assert levels.numel() == 2**bits
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert (levels[1:] > levels[:-1]).all()  # strictly increasing
    if bits > 1:
        assert (levels == 0).sum() == 1  # an exact zero, as in QLoRA
        assert (levels > 0).sum() == 2 ** (bits - 1)  # one more positive level than negative


@st.composite
def codebook_cases(draw):
    x = draw(blocks())
    axis = draw(st.sampled_from(["token", "channel"]))
    group = draw(group_sizes(x, axis))
    if draw(st.booleans()):
        codec = NormalFloatCodec(draw(st.integers(2, 4)), axis, group)
    else:
        bits = draw(st.integers(1, 4))
        raw = draw(st.lists(st.floats(-1, 1, width=32, allow_subnormal=False), min_size=2**bits, max_size=2**bits, unique=True))
        codec = CodebookCodec(torch.tensor(raw), axis, group)
    return x, codec


def coverage(levels: torch.Tensor) -> float:
    """Largest distance from a point of [-1, 1] to its nearest level."""
    gaps = (levels[1:] - levels[:-1]).max().item() / 2 if levels.numel() > 1 else 0.0
    return max(gaps, 1.0 - levels[-1].item(), levels[0].item() + 1.0)


@given(codebook_cases())
@settings(max_examples=150, deadline=None)
def test_codebook_error_bound(case):
    x, codec = case
    enc = codec.encode(x)
    x_hat = codec.decode(enc)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    err, lo, hi = error_and_range(x, x_hat, codec.axis, codec.group_size)
    scale = (hi - lo) / 2
    mag = torch.maximum(lo.abs(), hi.abs())
    # nearest level of [-1, 1] times the scale, plus fp16 rounding of the stored zero and scale
    bound = scale * (coverage(codec.levels) * (1 + 2 * FP16_EPS) + 2 * FP16_EPS) + 2 * mag * FP16_EPS + 1e-6 * mag + 3 * FP16_TINY
    assert (err <= bound).all(), float((err - bound).max())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_nf_error_close_to_bound_and_improves(bits, axis):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 2, 128, 64, generator=g)
    codec = NormalFloatCodec(bits, axis)
    x_hat = codec.decode(codec.encode(x))
    err, lo, hi = error_and_range(x, x_hat, axis, None)
    half_gap = coverage(codec.levels)
    assert (err <= (hi - lo) / 2 * half_gap * 1.002 + 2 * torch.maximum(lo.abs(), hi.abs()) * FP16_EPS).all()
    assert (err / ((hi - lo) / 2 * half_gap)).max() > 0.5
    if bits < 4:
        finer = NormalFloatCodec(bits + 1, axis)
        assert (finer.decode(finer.encode(x)) - x).pow(2).mean() < (x_hat - x).pow(2).mean()


def test_codebook_decodes_to_its_levels():
    levels = torch.tensor([-1.0, -0.25, 0.5, 1.0])
    x = torch.tensor([[[-2.0, -0.5, 1.0, 2.0, 0.9, -1.9, 0.1, 0.0]]])  # zero 0, scale 2
    codec = CodebookCodec(levels, "token")
    x_hat = codec.decode(codec.encode(x))
    assert torch.allclose(x_hat, torch.tensor([[[-2.0, -0.5, 1.0, 2.0, 1.0, -2.0, -0.5, -0.5]]]))


@given(codebook_cases())
@settings(max_examples=80, deadline=None)
def test_codebook_bits_accounting(case):
    x, codec = case
    enc = codec.encode(x)
    *lead, t, d = x.shape
    code_bytes = math.prod(lead) * math.ceil(t * d * codec.bits / 8)
    expected_bits = 8 * code_bytes + 32 * n_groups(x.shape, codec.axis, codec.group_size)  # fp16 zero + fp16 scale
    assert 8 * enc.nbytes() == expected_bits
    if isinstance(codec, NormalFloatCodec):
        assert codec.shared_nbytes() == 0  # a fixed datatype, nothing stored per layer
    else:
        assert codec.shared_nbytes() == 2 * 2**codec.bits  # the fp16 codebook


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_bits_per_element_by_hand(bits):
    x = torch.randn(1, 2, 128, 64)
    assert NormalFloatCodec(bits, "token").encode(x).bits_per_element() == bits + 32 / 64
    assert NormalFloatCodec(bits, "channel", 32).encode(x).bits_per_element() == bits + 32 / 32


@pytest.mark.parametrize("n", [0, 1, 3, 5, 6])
def test_codebook_needs_power_of_two_levels(n):
    with pytest.raises(ValueError, match="power-of-two"):
        CodebookCodec(torch.linspace(-1, 1, n))


def test_codebook_sorts_levels():
    codec = CodebookCodec(torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert codec.levels.tolist() == [-1.0, -0.5, 0.5, 1.0]
    assert codec.bits == 2


# --- token groups (what the simulator must respect) ------------------------------------------------

def test_token_group():
    assert UniformCodec(2, "channel", 32).token_group() == 32
    assert UniformCodec(2, "channel").token_group() == 1
    assert UniformCodec(2, "token", 32).token_group() == 1
    assert NormalFloatCodec(3, "channel", 16).token_group() == 16
    assert Fp16Codec().token_group() == 1


# --- saved state ---------------------------------------------------------------------------------

STATE_CASES = [
    Fp16Codec(),
    UniformCodec(2, "token"),
    UniformCodec(3, "channel", 32),
    UniformCodec(8, "token", 16),
    NormalFloatCodec(4, "token"),
    NormalFloatCodec(2, "channel", 8),
    CodebookCodec(torch.tensor([-0.9, -0.3, 0.1, 0.8]), "channel", 16),
    CodebookCodec(torch.linspace(-1, 1, 8) ** 3, "token", None, name="cubic"),
]


@pytest.mark.parametrize("codec", STATE_CASES, ids=lambda c: type(c).__name__ + "-" + getattr(c, "name", ""))
def test_state_round_trip(codec):
    config, tensors = codec.state()
    json.dumps(config)  # the config is JSON-able
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    rebuilt = codec_from_state(type(codec).__name__, json.loads(json.dumps(config)), {k: v.clone() for k, v in tensors.items()})
    assert type(rebuilt) is type(codec)
    assert rebuilt.state()[0] == config
    for k, v in tensors.items():
        assert torch.equal(rebuilt.state()[1][k], v)
    x = torch.randn(2, 2, 32, 32)
    a, b = codec.encode(x), rebuilt.encode(x)
    assert isinstance(a, Encoded) and a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key])
    assert torch.equal(codec.decode(a), rebuilt.decode(b))
    assert rebuilt.shared_nbytes() == codec.shared_nbytes()
    assert rebuilt.token_group() == codec.token_group()


def test_codec_from_state_unknown():
    with pytest.raises(ValueError, match="unknown codec type 'Nope'"):
        codec_from_state("Nope", {}, {})


def test_roundtrip_helper_matches_encode_decode():
    x = torch.randn(1, 2, 16, 32, dtype=torch.float64)
    codec = UniformCodec(4, "channel", 8)
    x_hat, nbytes = codec.roundtrip(x)
    assert x_hat.dtype == torch.float64  # back in the caller's dtype
    enc = codec.encode(x)
    assert nbytes == enc.nbytes()
    assert torch.equal(x_hat, codec.decode(enc).double())
