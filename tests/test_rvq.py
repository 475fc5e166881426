"""The residual-VQ codec: grouping permutations, packed storage and bits, monotone error with depth,
chunking, outliers, state round trip, and the rvq-dD-cC-gG method family."""
from __future__ import annotations

import pytest
import torch

from kvpack.codecs import RVQCodec, codec_from_state
from kvpack.codecs.rvq import from_groups, group_permutation, residual_decode, residual_encode, to_groups
from kvpack.errors import MethodError
from kvpack.methods.names import parse_method
from kvpack.methods import needs_calibration
from kvpack.methods.rvq.train import kmeans

pytestmark = pytest.mark.usefixtures("one_thread")


def structured(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows [n, dim] with low-rank structure plus noise, like projections of hidden states."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, dim, generator=g)
    return torch.randn(n, 6, generator=g) @ basis + 0.3 * torch.randn(n, dim, generator=g)


def stagewise_kmeans(vectors: torch.Tensor, depth: int, size: int) -> torch.Tensor:
    """Codebooks [depth, size, g]: k-means on each stage's residual (the initialization of rvq_train)."""
    gen = torch.Generator().manual_seed(0)
    residual, books = vectors.clone(), []
    for _ in range(depth):
        book, index = kmeans(residual, size, 6, gen)
        residual -= book[index]
        books.append(book)
    return torch.stack(books)


# --- grouping ------------------------------------------------------------------------------------

def test_strided_groups_take_every_nth_channel():
    perm = group_permutation(8, 4, "strided")
    x = torch.arange(8.0)
    groups = to_groups(x, perm, 4)
    assert groups.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert to_groups(x, group_permutation(8, 4, "contiguous"), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("grouping", ["strided", "contiguous"])
@pytest.mark.parametrize("dim,group", [(64, 32), (64, 64), (64, 8), (128, 32), (12, 3)])
def test_grouping_round_trip(grouping, dim, group):
    perm = group_permutation(dim, group, grouping)
    assert sorted(perm.tolist()) == list(range(dim))
    x = torch.randn(2, 3, 5, dim)
    v = to_groups(x, perm, group)
    assert v.shape == (2, 3, 5, dim // group, group)
    assert torch.equal(from_groups(v, perm), x)


def test_grouping_errors():
    with pytest.raises(ValueError, match="divisible"):
        group_permutation(64, 24, "strided")
    with pytest.raises(ValueError, match="grouping"):
        group_permutation(64, 32, "diagonal")


# --- encode / decode -----------------------------------------------------------------------------

def test_packed_storage_is_the_paper_bit_count():
    codec = RVQCodec(torch.randn(8, 2048, 32), head_dim=64, grouping="strided")
    x = torch.randn(1, 3, 10, 64)
    enc = codec.encode(x)
    # 2 groups x 8 stages x 11-bit codes = 22 bytes per token and head, plus the fp16 scale
    assert enc.tensors["codes"].shape == (1, 3, 10, 22) and enc.tensors["codes"].dtype == torch.uint8
    assert enc.tensors["scale"].dtype == torch.float16
    assert enc.bits_per_element() == pytest.approx(8 * 11 / 32 + 16 / 64)  # 3.0 at head_dim 64
    assert codec.shared_nbytes() == 8 * 2048 * 32 * 2
    assert codec.decode(enc).shape == x.shape


def test_decode_is_sum_of_codewords_times_scale():
    g = torch.Generator().manual_seed(0)
    codec = RVQCodec(torch.randn(3, 16, 4, generator=g), head_dim=8, grouping="strided")
    x = torch.randn(2, 5, 8, generator=g)
    enc = codec.encode(x)
    y = codec.decode(enc)
    groups, scale = codec.normalize(x)
    codes = residual_encode(groups.reshape(-1, 4), codec.codebooks)
    manual = codec.codebooks[torch.arange(3), codes].sum(1)  # [rows, g]
    assert torch.allclose(y, codec.denormalize(manual.view(2, 5, 2, 4), scale), atol=1e-6)


def test_residual_error_decreases_monotonically_with_depth():
    rows = structured(3000, 16)
    scale = rows.std(-1, keepdim=True, correction=0)
    train = to_groups(rows[:2000] / scale[:2000], group_permutation(16, 8, "strided"), 8).reshape(-1, 8)
    books = stagewise_kmeans(train, depth=6, size=32)
    test = rows[2000:].view(1, 1000, 16)
    errors = []
    for depth in range(1, 7):
        codec = RVQCodec(books[:depth], head_dim=16, grouping="strided")
        errors.append(float(((codec.decode(codec.encode(test)) - test) ** 2).mean() / (test ** 2).mean()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0]


def test_encode_chunking_does_not_change_codes():
    g = torch.Generator().manual_seed(1)
    books, v = torch.randn(4, 64, 8, generator=g), torch.randn(1000, 8, generator=g)
    assert torch.equal(residual_encode(v, books, chunk_rows=7), residual_encode(v, books))
    codes = residual_encode(v, books)
    assert torch.allclose(residual_decode(codes, books, chunk_rows=13), residual_decode(codes, books))


def test_greedy_picks_the_nearest_codeword_per_stage():
    g = torch.Generator().manual_seed(2)
    books, v = torch.randn(2, 32, 4, generator=g), torch.randn(50, 4, generator=g)
    codes = residual_encode(v, books)
    first = torch.cdist(v, books[0]).argmin(1)
    assert torch.equal(codes[:, 0], first)
    assert torch.equal(codes[:, 1], torch.cdist(v - books[0, first], books[1]).argmin(1))


def test_outliers_are_kept_exactly_and_counted():
    g = torch.Generator().manual_seed(3)
    lower, upper = -torch.ones(2, 16), torch.ones(2, 16)
    codec = RVQCodec(torch.randn(2, 16, 8, generator=g), 16, "contiguous", lower, upper)
    x = torch.randn(1, 2, 20, 16, generator=g) * 1.2
    enc = codec.encode(x)
    y = codec.decode(enc)
    mask = (x < -1) | (x > 1)
    assert int(enc.tensors["outlier_counts"].sum()) == int(mask.sum()) > 0
    assert torch.equal(y[mask], x[mask].half().float())
    plain = RVQCodec(codec.codebooks, 16, "contiguous")
    extra_bits = 8 * (enc.nbytes() - plain.encode(x).nbytes())
    assert extra_bits == 40 * 8 + int(mask.sum()) * (16 + 8)  # uint8 count per row, fp16 value + uint8 channel
    with pytest.raises(ValueError, match="per KV head"):
        codec.encode(torch.randn(3, 20, 16))


def test_state_round_trip_and_fp16_codebooks():
    codec = RVQCodec(torch.randn(2, 8, 4), 8, "strided", -torch.ones(1, 8), torch.ones(1, 8))
    config, tensors = codec.state()
    assert tensors["codebooks"].dtype == torch.float16
    again = codec_from_state("RVQCodec", config, tensors)
    x = torch.randn(1, 1, 7, 8)
    assert torch.equal(again.decode(again.encode(x)), codec.decode(codec.encode(x)))
    assert again.shared_nbytes() == codec.shared_nbytes() == 2 * 8 * 4 * 2 + 2 * 8 * 2


def test_codec_errors():
    with pytest.raises(ValueError, match="power of two"):
        RVQCodec(torch.randn(2, 12, 4), 8)
    with pytest.raises(ValueError, match="divisible"):
        RVQCodec(torch.randn(2, 8, 3), 8)
    with pytest.raises(ValueError, match="head_dim"):
        RVQCodec(torch.randn(2, 8, 4), 8).encode(torch.randn(3, 16))


def test_zero_vectors_decode_finite():
    codec = RVQCodec(torch.randn(2, 8, 4), 8)
    y = codec.decode(codec.encode(torch.zeros(1, 4, 8)))
    assert torch.isfinite(y).all()


# --- the method family ----------------------------------------------------------------------------

def test_rvq_presets_and_options():
    s = parse_method("rvq-d8-c2048-g32")
    assert s.family == "rvq" and s.pre_rope and needs_calibration(s)
    assert (s.options.depth, s.options.codes, s.key_group, s.value_group) == (8, 2048, 32, 32)
    assert (s.options.key_grouping, s.options.value_grouping, s.options.codebook_training) == ("strided", "contiguous", "ema")
    s = parse_method("rvq-d6-c1024-g32:key-contiguous:value-strided:kmeans-only:1pct:sink1")
    assert (s.options.key_grouping, s.options.value_grouping, s.options.codebook_training) == ("contiguous", "strided", "kmeans")
    assert s.options.outliers == pytest.approx(0.01) and s.sink_tokens == 1
    assert parse_method("rvq-d8-c1024-g64:0.5pct").options.outliers == pytest.approx(0.005)
    assert parse_method("rvq-d3-c256-g16").options.depth == 3


@pytest.mark.parametrize("bad,match", [
    ("rvq-d8-c1000-g32", "power of two"), ("rvq-d0-c256-g32", "depth"), ("rvq-d8-c256", "rvq-dD-cC-gG"),
    ("rvq-d8-c256-g32:wobble", "Unknown method option"), ("int4:kmeans-only", "Unknown method option"),
    ("rvq-d8-c256-g32:60pct", "percentage"),
])
def test_rvq_method_errors(bad, match):
    with pytest.raises(MethodError, match=match):
        parse_method(bad)
