"""RoPE inversion and attention interception on tiny random models of every supported family."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import VOCAB, make_tiny_model
from kvpack.errors import NonFiniteError, UnsupportedArchitectureError
from kvpack.evaluate.perplexity import simulated_perplexity, window_nll
from kvpack.hf.attention import attention_layers, intercept_kv
from kvpack.hf.models import check_architecture
from kvpack.recipes.recipe import Recipe
from kvpack.hf.rope import apply_rope, invert_rope, rotate_half
from kvpack.recipes.simulate import Simulator

pytestmark = pytest.mark.usefixtures("one_thread")

# --- rope ----------------------------------------------------------------------------------------


def angles(batch, tokens, rot, base=10000.0, scale=1.0, offset=0):
    """cos/sin [batch, tokens, rot] the way HF rotary modules build them (optionally scaled)."""
    inv = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    pos = torch.arange(offset, offset + tokens, dtype=torch.float64)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos() * scale, emb.sin() * scale
    return cos.float().expand(batch, -1, -1), sin.float().expand(batch, -1, -1)


@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 40),
    half=st.sampled_from([2, 4, 8, 32]),
    partial=st.sampled_from([1.0, 0.5, 0.25]),
    scale=st.sampled_from([1.0, 1.1386, 0.7]),
    offset=st.integers(0, 5000),
    seed=st.integers(0, 1000),
)
@settings(max_examples=150, deadline=None)
def test_invert_undoes_apply(batch, heads, tokens, half, partial, scale, offset, seed):
    dim = 2 * half
    rot = max(2, int(dim * partial) // 2 * 2)
    x = torch.randn(batch, heads, tokens, dim, generator=torch.Generator().manual_seed(seed))
    cos, sin = angles(batch, tokens, rot, scale=scale, offset=offset)
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape
    if rot < dim:
        assert torch.equal(y[..., rot:], x[..., rot:])  # channels past the rotary dim pass through
    assert torch.allclose(invert_rope(y, cos, sin), x, atol=1e-5)
    assert torch.allclose(apply_rope(invert_rope(x, cos, sin), cos, sin), x, atol=1e-5)
    # a rotation times the scaling factor: norms of each (c, c + rot/2) pair scale by `scale`
    pair = lambda t: t[..., : rot // 2] ** 2 + t[..., rot // 2 : rot] ** 2  # noqa: E731
    assert torch.allclose(pair(y), pair(x) * scale**2, rtol=1e-4, atol=1e-5)


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from transformers.models.phi.modeling_phi import apply_rotary_pos_emb as phi_apply

    q = torch.randn(2, 4, 9, 16)
    k = torch.randn(2, 2, 9, 16)
    cos, sin = angles(2, 9, 16, scale=1.2)
    _, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.allclose(apply_rope(k, cos, sin), k_ref, atol=1e-6)
    # partial rotary (Phi rotates the first rot_dim channels in its attention)
    cos8, sin8 = angles(2, 9, 8)
    _, k_rot = phi_apply(q[..., :8], k[..., :8], cos8, sin8)
    assert torch.allclose(apply_rope(k, cos8, sin8), torch.cat([k_rot, k[..., 8:]], -1), atol=1e-6)


def test_rotate_half_convention():
    x = torch.arange(1.0, 9.0)
    assert rotate_half(x).tolist() == [-5.0, -6.0, -7.0, -8.0, 1.0, 2.0, 3.0, 4.0]


def test_position_zero_is_identity():
    x = torch.randn(1, 2, 1, 16)
    cos, sin = angles(1, 1, 16)
    assert torch.equal(apply_rope(x, cos, sin), x)


# --- interception --------------------------------------------------------------------------------


class Recorder:
    """Identity transform that records what it was handed."""

    def __init__(self, pre_rope: bool):
        self.pre_rope = pre_rope
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer_idx, key, value):
        self.seen[layer_idx] = (key.clone(), value.clone())
        return key, value


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("pre_rope", [False, True], ids=["post-rope", "pre-rope"])
def test_identity_transform_leaves_logits_unchanged(tiny_model, tiny_ids, pre_rope):
    ref = logits(tiny_model, tiny_ids)
    rec = Recorder(pre_rope)
    with intercept_kv(tiny_model, rec):
        out = logits(tiny_model, tiny_ids)
    assert sorted(rec.seen) == [0, 1]  # every layer went through the transform
    cfg = tiny_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for key, value in rec.seen.values():
        # [batch, kv_heads, tokens, head_dim]: before GQA repetition
        assert key.shape == value.shape == (2, cfg.num_key_value_heads, tiny_ids.shape[1], head_dim)
    tol = 0 if not pre_rope else 1e-5  # post-RoPE is the very same computation
    assert (out - ref).abs().max().item() <= tol
    assert tiny_model.config._attn_implementation in ("sdpa", "eager")


def k_proj_outputs(model, ids):
    """Layer -> (keys as the model rotates them, values), captured with hooks: the real pre-RoPE K/V."""
    layers = attention_layers(model)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer in layers:
        heads_dim = lambda out, layer=layer: out.view(out.shape[0], out.shape[1], -1, layer.head_dim).transpose(1, 2)  # noqa: E731
        store = captured.setdefault(layer.layer_idx, {})
        handles.append(layer.k_proj.register_forward_hook(lambda m, a, out, s=store, f=heads_dim: s.__setitem__("k", f(out))))
        handles.append(layer.v_proj.register_forward_hook(lambda m, a, out, s=store, f=heads_dim: s.__setitem__("v", f(out))))
        if hasattr(layer, "k_norm"):  # Gemma3 normalizes keys per head ([b, h, t, d]) before RoPE
            handles.append(layer.k_norm.register_forward_hook(lambda m, a, out, s=store: s.__setitem__("k", out)))
    try:
        logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return captured


EXTRA_ROPE_MODELS = {
    "llama-yarn": lambda: make_tiny_model("llama", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear": lambda: make_tiny_model("llama", rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
}


def phi_partial():
    from transformers import AutoModelForCausalLM, PhiConfig

    torch.manual_seed(0)
    cfg = PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=VOCAB, partial_rotary_factor=0.5, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()


EXTRA_ROPE_MODELS["phi-partial-rotary"] = phi_partial


@pytest.fixture(params=sorted(EXTRA_ROPE_MODELS))
def extra_rope_model(request):
    return EXTRA_ROPE_MODELS[request.param]()


def check_pre_rope_keys_exact(model, ids):
    truth = k_proj_outputs(model, ids)
    rec = Recorder(pre_rope=True)
    with intercept_kv(model, rec):
        out = logits(model, ids)
    for idx, (key, value) in rec.seen.items():
        assert torch.allclose(key, truth[idx]["k"], atol=1e-5), idx
        # layer 0 sees the very values v_proj made; later layers see the (1e-7) effect of rotating keys back and forth
        assert torch.equal(value, truth[idx]["v"]) if idx == 0 else torch.allclose(value, truth[idx]["v"], atol=1e-5)
    return out


def test_pre_rope_keys_are_the_k_proj_outputs(tiny_model, tiny_ids):
    check_pre_rope_keys_exact(tiny_model, tiny_ids)


def test_scaled_and_partial_rope_models(extra_rope_model, tiny_ids):
    ref = logits(extra_rope_model, tiny_ids)
    out = check_pre_rope_keys_exact(extra_rope_model, tiny_ids)
    assert (out - ref).abs().max().item() <= 1e-5


def test_yarn_cos_sin_are_really_scaled(tiny_ids):
    model = EXTRA_ROPE_MODELS["llama-yarn"]()
    cos, sin = model.model.rotary_emb(torch.zeros(1, 8, 64), torch.arange(8)[None])
    factor = (cos**2 + sin**2).mean().sqrt().item()
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-4)  # so inversion must divide by it


@pytest.mark.parametrize("pre_rope", [False, True], ids=["post-rope", "pre-rope"])
def test_recipes_change_logits(tiny_model, tiny_ids, pre_rope):
    ref = logits(tiny_model, tiny_ids)
    suffix = ":pre-rope" if pre_rope else ""
    with intercept_kv(tiny_model, Simulator(Recipe.baseline("fp16" + suffix, 2))):
        fp16 = logits(tiny_model, tiny_ids)
    with intercept_kv(tiny_model, Simulator(Recipe.baseline("int2" + suffix, 2))):
        int2 = logits(tiny_model, tiny_ids)
    with intercept_kv(tiny_model, Simulator(Recipe.baseline("int8" + suffix, 2))):
        int8 = logits(tiny_model, tiny_ids)
    fp16_err = (fp16 - ref).abs().max().item()
    int2_err = (int2 - ref).abs().max().item()
    int8_err = (int8 - ref).abs().max().item()
    assert 0 < fp16_err < 1e-2  # K/V really rounded to fp16, and that costs almost nothing
    assert int2_err > 10 * max(fp16_err, int8_err)  # the transform is really applied
    assert int8_err < int2_err
    # and nothing stays installed afterwards
    assert torch.equal(logits(tiny_model, tiny_ids), ref)


def test_pre_and_post_rope_quantization_differ():
    model = make_tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 48), generator=torch.Generator().manual_seed(5))
    outs = {}
    for method in ["int3", "int3:pre-rope"]:
        with intercept_kv(model, Simulator(Recipe.baseline(method, 2))):
            outs[method] = logits(model, ids)
    assert not torch.allclose(outs["int3"], outs["int3:pre-rope"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_implementation_restored(attn, tiny_ids):
    model = make_tiny_model("llama", attn)
    assert model.config._attn_implementation == attn
    rec = Recorder(pre_rope=True)
    with intercept_kv(model, rec):
        assert model.config._attn_implementation == attn  # switched only while a forward runs
        logits(model, tiny_ids[:1, :8])
        assert model.config._attn_implementation == attn
    assert sorted(rec.seen) == [0, 1]  # the forward ran through kvpack's attention function
    assert model.config._attn_implementation == attn
    # also when the block raises
    with pytest.raises(RuntimeError, match="boom"):
        with intercept_kv(model, Recorder(pre_rope=False)):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == attn
    layers = attention_layers(model)
    assert not any(hasattr(layer, a) for layer in layers for a in ("_kvpack_rope", "_kvpack_transform"))
    rec = Recorder(pre_rope=False)
    logits(model, tiny_ids[:1, :8])  # the installed hooks do nothing outside a block
    assert not rec.seen


def test_multimodal_config_with_nested_text_config(tiny_ids):
    """Gemma3 with a vision tower: the decoder's settings live under `config.text_config`."""
    from transformers import AutoModelForCausalLM, Gemma3Config, SiglipVisionConfig

    from conftest import tiny_config

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    check_architecture(model.config)
    ids = tiny_ids[:1, :20]
    ref = logits(model, ids)
    rec = Recorder(pre_rope=True)
    with intercept_kv(model, rec):
        same = logits(model, ids)
    assert sorted(rec.seen) == [0, 1]
    assert (same - ref).abs().max() <= 1e-5
    with intercept_kv(model, Simulator(Recipe.baseline("int2:pre-rope", 2))):
        q = logits(model, ids)
    assert (q - ref).abs().max() > 1e-3
    assert model.config._attn_implementation == model.config.text_config._attn_implementation == "sdpa"


def test_simulated_perplexity_runs(tiny_model):
    windows = torch.randint(3, VOCAB, (3, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        total = sum(window_nll(tiny_model, w[None])[0] for w in windows)
    plain = math.exp(total / (3 * 23))
    fp16 = simulated_perplexity(tiny_model, windows, Recipe.baseline("fp16", 2), progress=False)
    assert fp16.windows == 3 and fp16.tokens == 3 * 23
    assert fp16.bits_per_element == 16.0
    assert fp16.ppl == pytest.approx(plain, rel=1e-3)
    assert fp16.nll == pytest.approx(math.log(fp16.ppl))
    assert fp16.method == "fp16" and fp16.seconds > 0
    int2 = simulated_perplexity(tiny_model, windows, Recipe.baseline("int2:pre-rope", 2), progress=False)
    assert int2.ppl != fp16.ppl
    assert int2.bits_per_element == pytest.approx(2 + 32 / 16)  # head_dim 16: fp16 min + step per token
    assert math.isfinite(int2.ppl) and int2.ppl > 1


@pytest.mark.parametrize("target,pre_rope", [("v_proj", False), ("v_proj", True), ("k_proj", True), ("k_proj", False)])
def test_nan_raises_nonfinite(target, pre_rope, tiny_ids):
    model = make_tiny_model("qwen2")
    layer = attention_layers(model)[1]

    def poison(module, args, out):
        out = out.clone()
        out[0, 3, 5] = float("nan")
        return out

    getattr(layer, target).register_forward_hook(poison)
    recipe = Recipe.baseline("int4:pre-rope" if pre_rope else "int4", 2)
    windows = tiny_ids[:1]
    what = "keys" if target == "k_proj" else "values"
    with pytest.raises(NonFiniteError, match=f"layer 1 {what}"):
        simulated_perplexity(model, windows, recipe, progress=False)
    assert model.config._attn_implementation == "sdpa"


# --- unsupported architectures -------------------------------------------------------------------


def gpt2_tiny():
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_model_without_rope_rejected():
    model = gpt2_tiny()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' has no rotary position embedding"):
        check_architecture(model.config)
    with pytest.raises(UnsupportedArchitectureError, match="rotary"):
        with intercept_kv(model, Recorder(pre_rope=False)):
            pass
    assert model.config._attn_implementation != "kvpack_sdpa"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gemma3"])
def test_supported_configs_pass(arch):
    from conftest import tiny_config

    check_architecture(tiny_config(arch))


def test_interleaved_rope_refused_for_pre_rope(tiny_ids):
    """Cohere rotates interleaved pairs (2i, 2i+1): its pre-RoPE keys cannot be recovered with the
    rotate_half convention, so pre-RoPE interception must refuse instead of quantizing wrong keys."""
    from transformers import AutoModelForCausalLM, CohereConfig

    torch.manual_seed(0)
    cfg = CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with pytest.raises(UnsupportedArchitectureError, match="rotate_half"):
        with intercept_kv(model, Recorder(pre_rope=True)):
            pass
    assert model.config._attn_implementation == "sdpa"
    # post-RoPE interception does not depend on the convention and still works
    ref = logits(model, tiny_ids)
    with intercept_kv(model, Recorder(pre_rope=False)):
        assert torch.equal(logits(model, tiny_ids), ref)


def test_rope_check_allows_float_rounding_of_large_angles_not_another_rope():
    """The once-per-layer check that the rotary module reproduces the cos/sin a layer used accepts what float32 makes
    of large angles computed another way (it failed at 2K tokens with 2 threads: 1.5e-4 apart), and still refuses
    the cos/sin of another RoPE base."""
    from kvpack.hf.rope import RopeSource

    model = make_tiny_model("llama")
    source = RopeSource(model, attention_layers(model), [])
    positions = torch.arange(4096).unsqueeze(0)
    cos, sin = source.compute(0, positions, torch.float32)
    angle = torch.atan2(sin, cos).double()
    wobble = 6 * 2.0 ** -24 * positions.double().unsqueeze(-1)  # an angle rounded a few ulps of p away
    source.verify(0, positions, torch.cos(angle + wobble).float(), torch.sin(angle + wobble).float())
    assert 0 in source.verified
    other_cos, other_sin = angles(1, 4096, cos.shape[-1], base=20000.0)
    with pytest.raises(UnsupportedArchitectureError, match="does not reproduce the cos/sin"):
        source.verify(1, positions, other_cos, other_sin)

