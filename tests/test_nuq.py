"""KVQuant nuqN codec and its fitting: state round trip, honest bytes, quality ordering, Q-Norm."""
import math

import pytest
import torch

from kvpack.codecs import codec_from_state
from kvpack.codecs.kmeans import weighted_kmeans_1d
from kvpack.codecs.nuq import NuqCodec, outliers_per_side, range_to_zero_scale
from kvpack.methods.kvquant.fit import blocks, fit_nuq, quantile
from kvpack.methods.names import parse_method


def _x(seed=0, shape=(1, 3, 64, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.linspace(0.5, 3, shape[-1])


def _fit(method, x, fisher=None, axis="token"):
    return fit_nuq(x, fisher, axis, parse_method(method))


def test_outliers_per_side():
    assert outliers_per_side(0.0, 192) == 0
    assert outliers_per_side(0.01, 192) == 1
    assert outliers_per_side(0.01, 64) == 1  # at least one when outliers are on
    assert outliers_per_side(0.1, 64) == 3
    assert outliers_per_side(0.49, 4) == 1  # never the whole vector


@pytest.mark.parametrize("method,axis", [
    ("kvquant-3bit-1pct", "channel"), ("kvquant-3bit-1pct", "token"), ("kvquant-2bit:cb-head:qnorm", "token"),
    ("kvquant-4bit-1pct:out-matrix", "channel"), ("kvquant-4bit-1pct:out-matrix:vspan-head", "token"),
])
def test_state_roundtrip(method, axis):
    x = _x(1, (2, 3, 64, 16))
    codec = _fit(method, x, torch.rand_like(x), axis)
    config, tensors = codec.state()
    again = codec_from_state("NuqCodec", config, tensors)
    y = _x(2)
    assert torch.equal(codec.decode(codec.encode(y)), again.decode(again.encode(y)))
    assert again.shared_nbytes() == codec.shared_nbytes()


def test_bytes_are_honest():
    x = _x(3)
    codec = NuqCodec(torch.linspace(-1, 1, 8), "token", heads=3, head_dim=16, outlier_frac=0.05, span="all")
    enc = codec.encode(x)
    tokens = x.shape[-2]
    nnz = enc.tensors["outlier_values"].numel()
    expected = math.ceil(3 * tokens * 16 * 3 / 8) + tokens * 2 * 2 + nnz * 3 + tokens * 1
    assert enc.nbytes() == expected
    assert nnz == tokens * 2 * outliers_per_side(0.05, 48)


def test_more_bits_less_error_and_learned_beats_uniform():
    x = torch.randn(2, 3, 256, 16, generator=torch.Generator().manual_seed(4))
    errors = {}
    for bits in (2, 3, 4):
        for weighting in ("plain", "uniform"):
            codec = _fit(f"kvquant-{bits}bit:{weighting}:vspan-head", x)
            errors[bits, weighting] = float((codec.decode(codec.encode(x)) - x).pow(2).mean())
    assert errors[2, "plain"] > errors[3, "plain"] > errors[4, "plain"]
    for bits in (2, 3):  # gaussian data: k-means levels beat the int grid
        assert errors[bits, "plain"] < errors[bits, "uniform"]


def test_fisher_weights_pull_levels():
    x = torch.randn(1, 1, 4096, 8, generator=torch.Generator().manual_seed(5))
    fisher = torch.ones_like(x)
    fisher[x > 1] = 1000.0  # the high values are the ones that matter
    plain = _fit("kvquant-2bit:plain:vspan-head:no-qnorm", x).levels[0]
    weighted = _fit("kvquant-2bit:fisher:vspan-head:no-qnorm", x, fisher).levels[0]
    assert int((weighted > 0.2).sum()) > int((plain > 0.2).sum()) or float(weighted[-2]) > float(plain[-2])


def test_fisher_needed():
    x = _x(6)
    with pytest.raises(Exception, match="Fisher"):
        _fit("kvquant-3bit", x, None)


def test_channel_thresholds_from_calibration_quantiles():
    x = _x(7, (4, 3, 500, 16))
    codec = _fit("kvquant-3bit-1pct:plain", x, axis="channel")
    _, mask, _, _ = codec.normalize(x)
    assert 0.005 < float(mask.float().mean()) < 0.02  # ~1% of calibration values are outliers
    plain = _fit("kvquant-3bit:plain", x, axis="channel")
    u, mask, _, _ = plain.normalize(x)
    assert mask is None and float(u.abs().max()) <= 1.0 + 1e-3  # min/max ranges cover the calibration data


def test_qnorm_matches_mean_and_std():
    x = _x(8, (2, 3, 256, 16))
    codec = _fit("kvquant-2bit:plain:qnorm:vspan-head", x)
    u, _, _, _ = codec.normalize(x)
    deq = codec.dequantize_normalized(codec.quantize_normalized(u))
    assert abs(float(deq.mean() - u.mean())) < 0.01
    assert abs(float(deq.std() / u.std()) - 1) < 0.01
    assert codec.shared_nbytes() == 4 * 2 + 2 * 2  # fp16 levels + the (a, b) pair


def test_per_head_codebooks_differ():
    x = _x(9, (2, 3, 256, 16))
    x[:, 2] = x[:, 2].sign() * x[:, 2].abs() ** 3  # a heavy-tailed head
    codec = _fit("kvquant-3bit:plain:cb-head:vspan-head", x)
    assert codec.levels.shape == (3, 8)
    assert not torch.allclose(codec.levels[0], codec.levels[2], atol=1e-2)


def test_wrong_shape_rejected():
    zero, scale = range_to_zero_scale(torch.full((3, 16), -1.0), torch.ones(3, 16))
    codec = NuqCodec(torch.linspace(-1, 1, 4), "channel", heads=3, head_dim=16, zero=zero, scale=scale)
    with pytest.raises(ValueError, match="recipe calibrated for this model"):
        codec.encode(torch.zeros(1, 2, 5, 16))


def test_blocks_and_quantile():
    rows = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(-1, 2)
    heads = torch.arange(3).repeat_interleave(4).repeat(2)
    b = blocks(rows, heads, 3)
    assert b.shape == (2, 3, 4, 2) and torch.equal(b[1, 2, 3], rows[-1])
    data = torch.randn(101, 3).sort(0).values
    assert torch.allclose(quantile(data, 0.3, 0), torch.quantile(data, 0.3, dim=0))


def test_per_channel_codebooks():
    x = _x(10, (2, 3, 256, 16))
    x[..., 3] = x[..., 3].abs()  # a one-sided channel
    codec = _fit("kvquant-2bit:plain:cb-channel:no-qnorm", x, axis="channel")
    assert codec.levels.shape == (48, 4) and codec.codebooks == "channel"
    u, _, _, _ = codec.normalize(x)
    codes = codec.quantize_normalized(u)
    # every element decodes through its own channel's codebook
    h, d = 1, 3
    assert torch.equal(codec.dequantize_normalized(codes)[:, h, :, d], codec.levels[h * 16 + d][codes[:, h, :, d]])
    per_channel = float((codec.decode(codec.encode(x)) - x).pow(2).mean())
    layer = _fit("kvquant-2bit:plain:no-qnorm", x, axis="channel")
    assert per_channel < float((layer.decode(layer.encode(x)) - x).pow(2).mean())
    again = codec_from_state("NuqCodec", *codec.state())
    assert torch.equal(again.decode(again.encode(x)), codec.decode(codec.encode(x)))
    assert codec.shared_nbytes() == 48 * 4 * 2 + 2 * 48 * 2


def test_allocate_bits_prefers_sensitive_channels():
    from kvpack.methods.kvquant.fit import allocate_bits

    widths = [1, 2, 3, 4]
    base = torch.tensor([100.0, 1.0, 1.0, 0.01]).double()
    error = base[:, None] * 4.0 ** -torch.tensor(widths).double()  # error / 4 per extra bit
    bits = allocate_bits(error, widths, 2.0)
    assert int(bits.sum()) == 8 and int(bits[0]) == 4 and int(bits[3]) == 1
    assert torch.equal(allocate_bits(error, widths, 1.0), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError):
        allocate_bits(error, widths, 5.0)


def test_mixed_width_codec_roundtrip_and_bytes():
    from kvpack.methods.kvquant.fit import _from_ladder, allocate_bits, ladder

    x = _x(11, (2, 3, 128, 16))
    fisher = torch.rand_like(x)
    fisher[:, 0, :, :4] *= 1000  # four very sensitive channels
    settings = parse_method("kvquant-2bit-1pct:alloc-tensor")
    lad = ladder(x, fisher, "channel", settings, [1, 2, 3, 4, 5])
    bits = allocate_bits(lad.error, lad.widths, 2.0)
    codec = _from_ladder(lad, bits)
    assert codec.mean_bits == 2.0 and int(bits[:4].min()) > 2
    enc = codec.encode(x)
    widths = {int(b): int((bits == b).sum()) for b in bits.unique()}
    assert enc.tensors.keys() >= {f"codes{b}" for b in widths}
    code_bytes = sum(enc.tensors[f"codes{b}"].numel() for b in widths)
    assert code_bytes == sum(2 * math.ceil(128 * n * b / 8) for b, n in widths.items())
    again = codec_from_state("NuqCodec", *codec.state())
    assert torch.equal(again.decode(again.encode(x)), codec.decode(enc))
    assert codec.shared_nbytes() == int((1 << bits).sum()) * 2 + 48 + 2 * 48 * 2 + 48 * 2 * 2  # + Q-Norm pairs
    # more bits where Fisher is large: those channels are reproduced better
    err = (codec.decode(enc) - x).pow(2).mean((0, 2))
    assert float(err[0, :4].mean()) < float(err[1:, :4].mean())


def test_constant_token_decodes_to_itself_when_zero_is_not_a_level():
    # levels without 0: a constant vector has range 0; it must come back as its (fp16) value, not value + level
    codec = NuqCodec(torch.tensor([-1.0, -0.3, 0.4, 1.0]), "token", heads=2, head_dim=8, span="all")
    x = torch.full((1, 2, 5, 8), 0.75)
    out = codec.decode(codec.encode(x))
    assert torch.allclose(out, x, atol=1e-6)


def test_allocate_bits_pays_codebooks_from_the_budget_and_rounds_counts():
    from kvpack.methods.kvquant.fit import allocate_bits

    widths = [1, 2, 3, 4, 5, 6]
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g).double() * 100 + 0.01
    error = base[:, None] * 4.0 ** -torch.tensor(widths).double()
    plain = allocate_bits(error, widths, 3.0)
    assert int(plain.sum()) == 3 * 64
    tokens = 64  # short sequences: codebooks weigh a lot, so fewer wide channels
    paid = allocate_bits(error, widths, 3.0, tokens=tokens, tensor_channels=32, multiple=8)
    cost = (tokens * paid + 16 * 2 ** paid).sum()
    assert cost <= 64 * tokens * 3 and int(paid.max()) < int(plain.max())
    for part in paid.split(32):
        assert all(int((part == w).sum()) % 8 == 0 for w in widths)
    with pytest.raises(ValueError, match="multiples of 8"):
        allocate_bits(error, widths, 3.0, tokens=tokens, tensor_channels=12, multiple=8)
