"""Dense-and-sparse outliers: exact fp16 restore, honest compact layout."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs import sparse
from kvpack.codecs.kmeans import weighted_kmeans_1d
from kvpack.codecs.nuq import NuqCodec, range_to_zero_scale


def test_index_dtype():
    assert sparse.index_dtype(255) == torch.uint8
    assert sparse.index_dtype(256) == torch.int16
    assert sparse.index_dtype(40000) == torch.int32


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20), st.integers(1, 300), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_rows_roundtrip_bit_exact(rows, n, density, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 1000).half()
    mask = torch.rand(rows, n, generator=g) < density
    enc = sparse.encode_rows(x.float(), mask)
    values, got_mask = sparse.decode_rows(enc, rows, n)
    assert torch.equal(got_mask, mask)
    assert torch.equal(values[mask].half().view(torch.int16), x[mask].view(torch.int16))  # bit-exact
    assert bool((values[~mask] == 0).all())
    assert enc["indices"].dtype == sparse.index_dtype(n - 1) and enc["counts"].dtype == sparse.index_dtype(n)
    nnz = int(mask.sum())
    assert sparse.nbytes(enc) == nnz * (2 + enc["indices"].element_size()) + rows * enc["counts"].element_size()
    assert torch.equal(sparse.pointers(enc["counts"])[-1], torch.tensor(nnz))


def test_outlier_mask_thresholds():
    x = torch.tensor([[-3.0, -1.0, 0.0, 1.0, 3.0]])
    assert sparse.outlier_mask(x, torch.tensor(-1.0), torch.tensor(1.0)).tolist() == [[True, False, False, False, True]]


def _levels(bits=3):
    return weighted_kmeans_1d(torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 2 - 1, 1 << bits)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["head", "all"]), st.floats(0.005, 0.2), st.integers(0, 10_000))
def test_value_outliers_restored_bit_exact(span, frac, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 17, 16, generator=g).half()
    x[0, 1, 3, 5] = 300.0  # a big outlier
    codec = NuqCodec(_levels(), "token", heads=3, head_dim=16, outlier_frac=frac, span=span)
    enc = codec.encode(x.float())
    out = codec.decode(enc)
    _, mask, _, _ = codec.normalize(x.float())
    assert bool(mask[0, 1, 3, 5])
    assert torch.equal(out[mask].half().view(torch.int16), x[mask].view(torch.int16))
    assert enc.tensors["outlier_values"].numel() == int(mask.sum())


def test_key_outliers_restored_bit_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 300, 8, generator=g).half()
    zero, scale = range_to_zero_scale(torch.full((2, 8), -1.5), torch.full((2, 8), 1.5))
    codec = NuqCodec(_levels(2), "channel", heads=2, head_dim=8, outlier_frac=0.01, zero=zero, scale=scale)
    enc = codec.encode(x.float())
    out = codec.decode(enc)
    mask = x.float().abs() > 1.5
    assert int(mask.sum()) > 0
    assert torch.equal(out[mask].half().view(torch.int16), x[mask].view(torch.int16))
    # one CSR row per token over both heads: uint8 channel indices, one uint8 count per token
    assert enc.tensors["outlier_indices"].dtype == torch.uint8
    assert enc.tensors["outlier_counts"].numel() == 300 and enc.tensors["outlier_counts"].dtype == torch.uint8
    one = codec.encode(x[:, :, :1].float())  # a single streamed token costs one count
    assert one.tensors["outlier_counts"].numel() == 1
