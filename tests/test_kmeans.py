"""Weighted 1-D k-means: weighting, determinism, Lloyd fixed point."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs.kmeans import assign, weighted_kmeans_1d


def test_two_clusters_unweighted():
    x = torch.tensor([0.0, 1.0, 10.0, 11.0])
    assert torch.allclose(weighted_kmeans_1d(x, 2), torch.tensor([0.5, 10.5]))


def test_heavy_point_pulls_its_centroid():
    x = torch.tensor([0.0, 1.0, 10.0, 11.0])
    w = torch.tensor([1.0, 1.0, 1.0, 100.0])
    c = weighted_kmeans_1d(x, 2, w)
    assert torch.allclose(c[0], torch.tensor(0.5))
    assert abs(float(c[1]) - (10 + 1100) / 101) < 1e-5
    assert float(c[1]) > 10.9  # pulled from 10.5 towards the heavy point


def test_k1_is_weighted_mean_and_zero_weights_ignored():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    w = torch.tensor([1.0, 1.0, 2.0, 0.0])
    assert abs(float(weighted_kmeans_1d(x, 1, w)[0]) - 9 / 4) < 1e-6


def test_deterministic_and_sorted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g)
    w = torch.rand(5000, generator=g)
    a, b = weighted_kmeans_1d(x, 8, w), weighted_kmeans_1d(x, 8, w)
    assert torch.equal(a, b)
    assert bool((a[1:] >= a[:-1]).all())


def test_bad_weights_raise():
    x = torch.tensor([1.0, 2.0])
    for w in (torch.tensor([-1.0, 1.0]), torch.tensor([float("nan"), 1.0]), torch.tensor([1.0])):
        try:
            weighted_kmeans_1d(x, 1, w)
        except ValueError:
            continue
        raise AssertionError(f"weights {w} accepted")


def test_fewer_points_than_clusters():
    c = weighted_kmeans_1d(torch.tensor([1.0, 2.0]), 4)
    assert c.numel() == 4 and set(c.tolist()) <= {1.0, 2.0}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=2, max_size=200),
    st.integers(1, 8),
    st.integers(0, 10_000),
)
def test_lloyd_fixed_point(values, k, seed):
    x = torch.tensor(values)
    w = torch.rand(x.numel(), generator=torch.Generator().manual_seed(seed)) + 0.01
    c = weighted_kmeans_1d(x, k, w, iters=500)
    assert float(c.min()) >= float(x.min()) - 1e-3 and float(c.max()) <= float(x.max()) + 1e-3
    idx = assign(x, c)
    for j in idx.unique():
        sel = idx == j
        mean = float((x[sel].double() * w[sel]).sum() / w[sel].sum())
        assert abs(mean - float(c[j])) <= 1e-3 * max(1.0, abs(mean))


def test_weighted_objective_not_worse_than_unweighted():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g)
    w = (x.abs() > 1.5).float() * 50 + 1  # the tails matter most
    def cost(c):
        return float((w * (x - c[assign(x, c)]) ** 2).sum())
    assert cost(weighted_kmeans_1d(x, 4, w)) <= cost(weighted_kmeans_1d(x, 4)) + 1e-6


def test_batched_rows_are_independent():
    from kvpack.codecs.kmeans import weighted_kmeans_1d_batched

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 500, generator=g) * torch.tensor([[1.0], [5.0], [0.1]])
    w = torch.rand(3, 500, generator=g)
    w[1, :250] = 0  # masked points
    batched = weighted_kmeans_1d_batched(x, 4, w)
    for row in range(3):
        keep = w[row] > 0
        assert torch.allclose(batched[row], weighted_kmeans_1d(x[row][keep], 4, w[row][keep]), atol=1e-5)
