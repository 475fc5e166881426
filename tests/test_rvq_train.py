"""Codebook learning for residual VQ: k-means, the EMA update math, dead-code restarts, and fitting
a recipe's per-layer codecs from calibration activations."""
from __future__ import annotations

import pytest
import torch

from kvpack.codecs import RVQCodec
from kvpack.recipes.collect import LayerActivations
from kvpack.errors import MethodError
from kvpack.methods.names import parse_method
from kvpack.methods.rvq.train import EMACodebooks, RVQTrainConfig, fit_rvq_recipe, kmeans, outlier_thresholds, train_rvq

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_update_math_on_a_toy_case():
    # one stage, two 1-D codes at 0 and 10 with counts 2 and 1 (sums 0 and 10)
    state = EMACodebooks.start(torch.tensor([[[0.0], [10.0]]]), torch.tensor([[2.0, 1.0]]), decay=0.9, eps=1e-5,
                               dead_fraction=0.0)
    residuals = torch.tensor([[1.0], [3.0], [12.0]])
    state.update(0, residuals, torch.tensor([0, 0, 1]))
    size = torch.tensor([0.9 * 2 + 0.1 * 2, 0.9 * 1 + 0.1 * 1])  # [2.0, 1.0]
    sums = torch.tensor([0.9 * 0 + 0.1 * 4, 0.9 * 10 + 0.1 * 12])  # [0.4, 10.2]
    assert torch.allclose(state.cluster_size[0], size)
    assert torch.allclose(state.embed_sum[0, :, 0], sums)
    total = size.sum()
    smoothed = (size + 1e-5) / (total + 2 * 1e-5) * total  # Laplace smoothing
    assert torch.allclose(state.codebook(0)[:, 0], sums / smoothed)
    assert state.codebook(0)[:, 0].tolist() == pytest.approx([0.2, 10.2], abs=1e-4)


def test_unused_codes_keep_their_codeword_under_ema():
    state = EMACodebooks.start(torch.tensor([[[1.0, 2.0], [5.0, 5.0]]]), torch.tensor([[1.0, 1.0]]), dead_fraction=0.0)
    for _ in range(50):
        state.update(0, torch.tensor([[1.5, 2.0]]), torch.tensor([0]))
    assert torch.allclose(state.codebook(0)[1], torch.tensor([5.0, 5.0]), atol=1e-3)
    assert float(state.codebook(0)[0, 0]) == pytest.approx(1 + 0.5 * (1 - 0.99 ** 50), rel=1e-4)  # pulled to the data


def test_dead_codes_restart_from_batch_residuals():
    codebooks = torch.tensor([[[0.0], [100.0], [200.0]]])
    state = EMACodebooks.start(codebooks, torch.tensor([[1.0, 1.0, 0.0]]), decay=0.99, dead_fraction=0.03)
    residuals = torch.tensor([[7.0], [7.0]])
    state.update(0, residuals, torch.tensor([0, 0]), torch.Generator().manual_seed(0))
    assert state.restarts == [1]
    assert state.codebook(0)[2, 0] == pytest.approx(7.0, rel=1e-3)  # code 2 was dead
    assert state.codebook(0)[1, 0] == pytest.approx(100.0, rel=1e-3)  # code 1 still alive


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = centers.repeat(200, 1) + 0.1 * torch.randn(800, 2, generator=g)
    book, index = kmeans(x, 4, 10, g)
    found = book[book[:, 0].argsort(stable=True)]
    assert torch.cdist(centers, book).min(1).values.max() < 0.1, found
    assert torch.bincount(index, minlength=4).tolist() == [200] * 4
    with pytest.raises(ValueError, match="at least as many vectors"):
        kmeans(x[:3], 4, 1, g)


def low_rank_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) @ torch.randn(4, dim, generator=g) + 0.2 * torch.randn(n, dim, generator=g)


def test_train_rvq_ema_refines_kmeans_and_reports():
    vectors = low_rank_rows(4000, 8, 0)
    config = RVQTrainConfig(kmeans_vectors=1000, kmeans_iters=3, ema_passes=2, batch_size=128, seed=0)
    books, info = train_rvq(vectors, depth=3, size=32, config=config, ema=True)
    kbooks, _ = train_rvq(vectors, depth=3, size=32, config=config, ema=False)
    assert books.shape == kbooks.shape == (3, 32, 8)
    held = low_rank_rows(2000, 8, 1)

    def error(b):
        codec = RVQCodec(b, 8, "contiguous")
        x = held.view(1, -1, 8)
        return float(((codec.decode(codec.encode(x)) - x) ** 2).mean())

    assert error(books) < 1.05 * error(kbooks)  # EMA on all vectors is at least as good as k-means on a subsample
    assert len(info["restarts"]) == 3


def test_fit_rvq_recipe_on_activations():
    heads, dim, rows = 2, 16, 3000
    layers = []
    for i in range(2):
        keys, values = low_rank_rows(rows, dim, 10 + i), low_rank_rows(rows, dim, 20 + i)
        keys[:, 3] *= 8  # an outlier channel in keys
        layers.append(LayerActivations(keys=keys, values=values, heads=torch.arange(rows) % heads))
    settings = parse_method("rvq-d4-c64-g8:1pct")
    config = RVQTrainConfig(train_vectors=4000, kmeans_vectors=2000, kmeans_iters=2, batch_size=256, heldout_vectors=512)
    keys, values, info = fit_rvq_recipe(None, layers, settings, config, progress=False)
    assert len(keys) == len(values) == 2
    assert keys[0].grouping == "strided" and values[0].grouping == "contiguous"
    assert keys[0].lower.shape == (heads, dim)
    for kind in ("keys", "values"):
        stats = info["layers"][0][kind]["heldout"]
        assert all(b < a for a, b in zip(stats["rel_error"], stats["rel_error"][1:]))
        assert all(1 <= u <= 64 for u in stats["usage_perplexity"])
    assert len(info["mean"]["keys_heldout_rel_error"]) == 4
    assert info["timing_s"]["rvq_fit"] > 0
    x = layers[0].keys[:100].view(1, heads, 50, dim)
    assert keys[0].decode(keys[0].encode(x)).shape == x.shape


def test_outlier_thresholds_leave_the_fraction_out():
    x = torch.randn(20000, 4)
    heads = torch.arange(20000) % 2
    lower, upper = outlier_thresholds(x, heads, 2, 0.02)
    outside = ((x < lower[heads]) | (x > upper[heads])).float().mean()
    assert outside == pytest.approx(0.02, abs=0.002)


def test_fit_rejects_post_rope_and_other_families():
    layers = [LayerActivations(keys=torch.randn(10, 8), values=torch.randn(10, 8), heads=torch.zeros(10, dtype=torch.long))]
    with pytest.raises(MethodError, match="pre-RoPE"):
        fit_rvq_recipe(None, layers, parse_method("rvq-d2-c4-g4:post-rope"), progress=False)
    with pytest.raises(MethodError, match="rvq"):
        fit_rvq_recipe(None, layers, parse_method("int4"), progress=False)
    with pytest.raises(MethodError, match="divisible"):
        fit_rvq_recipe(None, layers, parse_method("rvq-d2-c4-g3"), progress=False)


def test_shared_codebooks_are_one_object_written_once(tmp_path):
    """share<N>: N consecutive layers get the same codec object, a recipe writes it once and loads it back shared,
    and simulation counts its bytes once."""
    from conftest import make_tiny_model, make_tiny_tokenizer
    import kvpack
    from kvpack.evaluate.perplexity import simulated_perplexity
    from kvpack.recipes import Recipe

    assert parse_method("rvq-d2-c16-g8:share-all").options.share_layers == 0
    with pytest.raises(MethodError, match="N >= 1"):
        parse_method("rvq-d2-c16-g8:share0")
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (800,), generator=g)))
    own = kvpack.calibrate(model, tok, "rvq-d2-c16-g8", data=str(text), windows=3, seqlen=64, progress=False)
    shared = kvpack.calibrate(model, tok, "rvq-d2-c16-g8:share2", data=str(text), windows=3, seqlen=64, progress=False)
    assert own.key_codecs[0] is not own.key_codecs[1]
    assert shared.key_codecs[0] is shared.key_codecs[1] and shared.value_codecs[0] is shared.value_codecs[1]
    shared.save(tmp_path / "recipe")
    loaded = Recipe.load(tmp_path / "recipe", model)
    assert loaded.key_codecs[0] is loaded.key_codecs[1]
    torch.testing.assert_close(loaded.key_codecs[1].codebooks, shared.key_codecs[1].codebooks)
    ids = torch.randint(3, 120, (1, 48), generator=torch.Generator().manual_seed(1))
    a, b = (simulated_perplexity(model, ids, r, progress=False) for r in (own, shared))
    assert b.fixed_bytes * 2 == a.fixed_bytes > 0
    assert b.marginal_bits_per_element == pytest.approx(a.marginal_bits_per_element)
    assert b.bits_per_element < a.bits_per_element
