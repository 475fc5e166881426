"""TurboQuant codec: rotations, Lloyd-Max codebooks, distortion, QJL unbiasedness, honest bits, state."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kvpack.codecs import codec_from_state
from kvpack.codecs.lloyd_max import lloyd_max_distortion, lloyd_max_levels
from kvpack.codecs.rotation import Rotation, walsh_hadamard
from kvpack.codecs.turboquant import TurboQuantCodec, split_widths
from kvpack.errors import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_mse(codec: TurboQuantCodec, x: torch.Tensor) -> float:
    """Mean over vectors of ||x_hat - x||^2 / ||x||^2."""
    x_hat = codec.decode(codec.encode(x))
    return float((((x_hat - x) ** 2).sum(-1) / (x**2).sum(-1)).mean())


# --- rotations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 8, 64, 128])
def test_walsh_hadamard_is_orthonormal_and_its_own_inverse(d):
    h = walsh_hadamard(torch.eye(d, dtype=torch.float64))
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h, h.T)
    entries = h.abs() * math.sqrt(d)
    assert torch.allclose(entries, torch.ones_like(entries))  # +-1/sqrt(d): a Hadamard matrix


@pytest.mark.parametrize("d", [64, 48, 80])
def test_rotation_round_trip_and_inner_products(d):
    rot = Rotation(d, seed=3)
    assert rot.hadamard == (d == 64)
    x, q = torch.randn(5, 7, d), torch.randn(5, 7, d)
    assert torch.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-5)
    assert torch.allclose((rot.rotate(q) * rot.rotate(x)).sum(-1), (q * x).sum(-1), atol=1e-4)
    r = rot.as_matrix()
    assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)
    assert torch.allclose(rot.rotate(x), x @ r.T, atol=1e-5)


def test_rotation_is_seeded():
    assert torch.equal(Rotation(64, 1).as_matrix(), Rotation(64, 1).as_matrix())
    assert not torch.equal(Rotation(64, 1).as_matrix(), Rotation(64, 2).as_matrix())
    assert torch.equal(Rotation(48, 1).as_matrix(), Rotation(48, 1).as_matrix())
    with pytest.raises(ValueError, match="signs"):
        Rotation(4, signs=torch.tensor([1, 0, 1, -1]))


# --- Lloyd-Max codebooks ------------------------------------------------------------------------

def test_lloyd_max_gaussian_matches_published_values():
    assert lloyd_max_levels(1) == pytest.approx([-0.7979, 0.7979], abs=1e-4)  # +-sqrt(2/pi)
    assert lloyd_max_levels(2) == pytest.approx([-1.5104, -0.4528, 0.4528, 1.5104], abs=1e-4)
    # Max (1960): distortion 0.3634, 0.1175, 0.03454 at 1, 2, 3 bits
    assert [lloyd_max_distortion(b) for b in (1, 2, 3)] == pytest.approx([0.3634, 0.1175, 0.03454], rel=2e-3)


def test_lloyd_max_sphere_coordinate():
    assert lloyd_max_levels(1, 3) == pytest.approx([-0.5, 0.5], abs=1e-6)  # d=3: uniform on [-1, 1]
    assert lloyd_max_distortion(1, 3) == pytest.approx(1 / 3 - 0.25, abs=1e-6)
    # large d: sqrt(d) * coordinate -> N(0, 1)
    assert lloyd_max_levels(2, 4096) * 64 == pytest.approx([-1.5104, -0.4528, 0.4528, 1.5104], abs=2e-3)
    with pytest.raises(ValueError):
        lloyd_max_levels(2, 1)
    with pytest.raises(ValueError):
        lloyd_max_levels(-1)


# --- codec ----------------------------------------------------------------------------------------

def test_split_widths():
    assert split_widths(2.5, 64) == (3, 32, 2)
    assert split_widths(3.5, 64) == (4, 32, 3)
    assert split_widths(3.0, 64) == (4, 0, 3)
    assert split_widths(2.25, 48) == (3, 12, 2)


@pytest.mark.parametrize("d", [64, 80])
def test_mse_decreases_with_bits_and_matches_theory(d):
    torch.manual_seed(0)
    x = torch.randn(4, 500, d) * torch.linspace(0.1, 5, d)  # anisotropic: the rotation must spread it
    errors = []
    for bits in (1, 2, 2.5, 3, 3.5, 4):
        err = relative_mse(TurboQuantCodec(bits, d, seed=1), x)
        errors.append(err)
        if bits == int(bits):  # a unit vector's squared error is d x the per-coordinate distortion
            assert err == pytest.approx(d * lloyd_max_distortion(int(bits), d), rel=0.05)
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_qjl_makes_inner_products_unbiased():
    """Over seeds (rotation and sketch), q . k_hat with QJL averages to q . k; the MSE stage alone shrinks it."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(8, 64, generator=gen)
    q = k + 0.5 * torch.randn(8, 64, generator=gen)
    true = (q * k).sum(-1)
    est_qjl, est_mse = [], []
    for seed in range(300):
        for qjl, out in ((True, est_qjl), (False, est_mse)):
            codec = TurboQuantCodec(2, 64, seed=seed, qjl=qjl)  # QJL: 1-bit MSE stage + 1-bit sketch
            out.append((q * codec.decode(codec.encode(k))).sum(-1))
    for est, unbiased in ((torch.stack(est_qjl), True), (torch.stack(est_mse), False)):
        mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
        z = (mean - true) / se
        if unbiased:
            assert z.abs().max() < 4.0
        else:
            assert (z < -4.0).all()  # 2-bit MSE codes shrink every vector: q . k is underestimated


def test_qjl_hurts_mse_at_equal_bits():
    x = torch.randn(2, 400, 64)
    assert relative_mse(TurboQuantCodec(3, 64, qjl=True), x) > relative_mse(TurboQuantCodec(3, 64), x)


@pytest.mark.parametrize("bits,qjl,d", [(2, False, 64), (2.5, False, 64), (3.5, False, 64), (3.5, True, 64),
                                        (4, True, 128), (2.5, False, 48), (3, True, 80)])
def test_bits_measured_from_tensors_equal_the_formula(bits, qjl, d):
    codec = TurboQuantCodec(bits, d, qjl=qjl)
    enc = codec.encode(torch.randn(2, 3, 17, d))
    mse_bits = bits - qjl
    expected = (mse_bits * d + 16 + (d + 16 if qjl else 0)) / d  # codes + fp16 norm (+ sign sketch + fp16 residual norm)
    assert enc.bits_per_element() == pytest.approx(expected)
    assert codec.bits_formula() == pytest.approx(expected)
    assert enc.tensors["norm"].dtype == torch.float16
    assert all(t.dtype == torch.uint8 for n, t in enc.tensors.items() if n.startswith(("codes", "sketch")))
    assert set(enc.tensors) == set(codec.layout().parts)


@pytest.mark.parametrize("d,qjl,rescale", [(64, True, False), (48, False, True), (80, True, True)])
def test_state_round_trip(d, qjl, rescale):
    codec = TurboQuantCodec(2.5 if not qjl else 3.5, d, seed=7, qjl=qjl, rescale=rescale)
    config, tensors = codec.state()
    json.dumps(config)
    assert ("matrix" in tensors) == (d & (d - 1) != 0) and ("sketch" in tensors) == qjl
    again = codec_from_state(type(codec).__name__, config, {k: v.clone() for k, v in tensors.items()})
    x = torch.randn(3, 11, d)
    enc, enc2 = codec.encode(x), again.encode(x)
    assert all(torch.equal(enc.tensors[n], enc2.tensors[n]) for n in enc.tensors)
    assert torch.equal(codec.decode(enc), again.decode(enc))
    assert again.shared_nbytes() == codec.shared_nbytes()


def test_rescale_keeps_norms():
    x = torch.randn(100, 64) * 3
    codec = TurboQuantCodec(2, 64, rescale=True)
    assert torch.allclose(codec.decode(codec.encode(x)).norm(dim=-1), x.norm(dim=-1), rtol=2e-3)


def test_blocks_concatenate_and_zero_vectors_decode_to_zero():
    codec = TurboQuantCodec(2.5, 64, qjl=True)
    x = torch.randn(2, 3, 5, 64)
    x[0, 1, 2] = 0
    a, b = codec.encode(x[:1]), codec.encode(x[1:])
    both = type(a)({n: torch.cat([a.tensors[n], b.tensors[n]]) for n in a.tensors}, tuple(x.shape))
    decoded = codec.decode(both)
    assert torch.equal(decoded, codec.decode(codec.encode(x)))
    assert torch.equal(decoded[0, 1, 2], torch.zeros(64))
    part, alone = codec.slice_tokens(both, 1, 4), codec.encode(x[..., 1:4, :])  # a crop stores what encoding alone would
    assert part.shape == alone.shape and all(torch.equal(part.tensors[n], alone.tensors[n]) for n in alone.tensors)


def test_bad_input_is_refused():
    for bits in (0.5, 8.5, float("nan"), "3", True):
        with pytest.raises(ValueError):
            TurboQuantCodec(bits, 64)
    with pytest.raises(ValueError):
        TurboQuantCodec(3, 1)
    with pytest.raises(ValueError, match="levels"):
        TurboQuantCodec(3, 64, levels={3: torch.zeros(4)})
    codec = TurboQuantCodec(3, 64)
    with pytest.raises(ValueError, match="head_dim"):
        codec.encode(torch.randn(2, 32))
    bad = torch.randn(2, 64)
    bad[1, 3] = float("inf")
    with pytest.raises(NonFiniteError):
        codec.encode(bad)


# --- the family -----------------------------------------------------------------------------------

def test_family_names_and_options():
    from kvpack.errors import MethodError
    from kvpack.methods import parse_method

    s = parse_method("turboquant-3.5bit:qjl:pre-rope")
    assert s.family == "turboquant" and s.pre_rope and s.options.bits == 3.5 and s.options.qjl
    assert parse_method(s.name) == s
    assert not parse_method("turboquant-2.5bit").pre_rope  # keys post-RoPE by default, as in the paper
    for bad in ("turboquant-9bit", "turboquant-0.5bit", "turboquant-3bits", "turboquant-1bit:qjl", "turboquant-3bit:foo"):
        with pytest.raises(MethodError):
            parse_method(bad)
    from kvpack.recipes import Recipe

    with pytest.raises(MethodError, match="key-channel"):
        Recipe.baseline("turboquant-3bit:key-channel", 2)


def test_unbound_codec_equals_the_bound_one():
    """The family's codecs (built for the head_dim they meet) store exactly what an explicit codec stores."""
    x = torch.randn(2, 3, 9, 64)
    unbound, bound = TurboQuantCodec(2.5, seed=4, qjl=True), TurboQuantCodec(2.5, 64, seed=4, qjl=True)
    assert unbound.shared_nbytes() == 0  # nothing built before the first block
    enc, ref = unbound.encode(x), bound.encode(x)
    assert all(torch.equal(enc.tensors[n], ref.tensors[n]) for n in ref.tensors)
    assert torch.equal(unbound.decode(enc), bound.decode(ref))
    assert unbound.shared_nbytes() == bound.shared_nbytes()
    assert set(ref.tensors) <= set(unbound.layout().parts)
    again = codec_from_state("TurboQuantCodec", *unbound.state())
    assert torch.equal(again.decode(enc), bound.decode(ref))


@torch.no_grad()
def test_family_real_cache_matches_simulation():
    from conftest import make_tiny_model

    from kvpack.evaluate.perplexity import simulated_perplexity
    from kvpack.evaluate.streaming import streaming_perplexity
    from kvpack.recipes import Recipe

    model = make_tiny_model("llama")
    windows = torch.randint(3, 120, (1, 32), generator=torch.Generator().manual_seed(3))
    recipe = Recipe.baseline("turboquant-3bit:qjl", model.config.num_hidden_layers)
    sim = simulated_perplexity(model, windows, recipe, progress=False)
    real = streaming_perplexity(model, windows, recipe, chunk=32, progress=False)  # one prefill = the simulation
    assert real.ppl == pytest.approx(sim.ppl, rel=1e-6) and sim.kl > 0
    fp16 = simulated_perplexity(model, windows, Recipe.baseline("fp16", 2), progress=False, reference=False)
    assert sim.ppl != fp16.ppl


def test_center_is_subtracted_and_added_back():
    heads, d = 3, 64
    center = torch.randn(heads, d) * 10
    x = center[:, None, :] + 0.1 * torch.randn(2, heads, 50, d)  # vectors far from 0, close to their head's center
    plain, centered = TurboQuantCodec(3, d), TurboQuantCodec(3, d, center=center)
    err = lambda c: float(((c.decode(c.encode(x)) - x) ** 2).mean())  # noqa: E731
    assert err(centered) < err(plain) / 100
    assert centered.shared_nbytes() == plain.shared_nbytes() + heads * d * 2
    again = codec_from_state("TurboQuantCodec", *centered.state())
    assert torch.equal(again.decode(centered.encode(x)), centered.decode(centered.encode(x)))
    with pytest.raises(ValueError, match="heads"):
        centered.encode(torch.randn(2, 50, d))
    with pytest.raises(ValueError):
        TurboQuantCodec(3, center=center)


@pytest.mark.parametrize("name", ["turboquant-2.5bit", "turboquant-3bit", "turboquant-3.5bit:rescale", "turboquant-4bit:sink1"])
@pytest.mark.parametrize("queries", [1, 3])
def test_cpu_kernel_equals_the_torch_reference(name, queries):
    """The C++ kernel (keys scored against R q, values summed in the rotated frame, turned back once) reads the
    packed TurboQuant bits as the torch reference decodes them; QJL and pre-RoPE keys take the torch path."""
    from conftest import make_tiny_model
    from kvpack.cache.cache import CompressedCache
    from kvpack.hf.attention import cache_kwargs
    from kvpack.kernels import cpu, dispatch
    from kvpack.recipes import Recipe

    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.error()}")
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (1, 44), generator=torch.Generator().manual_seed(1))
    for method, kernel in ((name, True), (name + ":qjl", False), (name + ":pre-rope", False)):
        if "qjl" in method and "2.5" in method:
            continue
        cache = CompressedCache(model, Recipe.baseline(method, model.config.num_hidden_layers), block_tokens=8)
        with torch.no_grad():
            model(ids[:, :36], **cache_kwargs(cache))
            for t in range(36, 44):
                model(ids[:, t:t + 1], **cache_kwargs(cache))
        layer = cache.layers[1]
        q = torch.randn(1, model.config.num_attention_heads, queries, 16, generator=torch.Generator().manual_seed(2))
        paths = []
        ref = dispatch.layer_attention(layer, q, backend="torch", rope=cache.packed.rope)
        got = dispatch.layer_attention(layer, q, backend="auto", rope=cache.packed.rope, paths=paths)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
        assert (paths == [("layer", "cpu")]) == kernel, (method, paths)
