"""End to end on a tiny random Llama: calibrate, cache, simulate, CLI; KVQuant method names."""
import sys

import pytest
import torch

import kvpack
from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.errors import MethodError
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.methods import parse_method
from kvpack.methods.kvquant import KVQuantOptions
from kvpack.recipes.resolve import resolve_recipe
from kvpack.recipes.recipe import Recipe


@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = [f"w{int(i)}" for i in torch.randint(0, 100, (1200,), generator=g)]
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(words))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_calibrate_and_simulate(text_file):
    model = make_tiny_model("llama")
    tok = make_tiny_tokenizer()
    recipe = kvpack.calibrate(model, tok, "kvquant-4bit-1pct", data=str(text_file), windows=3, seqlen=64, progress=False)
    assert recipe.num_layers == 2 and recipe.key_codecs[0].axis == "channel" and recipe.value_codecs[0].axis == "token"
    timing = recipe.calibration["timing_s"]
    assert {"forward", "backward", "thresholds", "kmeans", "total"} <= set(timing)
    assert recipe.calibration["windows"] == 3 and recipe.calibration["fisher"] is True
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    fp16 = simulated_perplexity(model, ids, Recipe.baseline("fp16", 2), progress=False)
    q4 = simulated_perplexity(model, ids, recipe, progress=False)
    q2 = simulated_perplexity(model, ids, kvpack.calibrate(model, tok, "kvquant-2bit", data=str(text_file), windows=3, seqlen=64, progress=False), progress=False)
    assert abs(q4.nll - fp16.nll) < 0.01 and abs(q4.nll - fp16.nll) <= abs(q2.nll - fp16.nll) + 1e-3
    assert 4.0 < q4.bits_per_element < 16 and q2.bits_per_element < q4.bits_per_element


def test_cache_hit_second_time(text_file, cache, monkeypatch):
    model = make_tiny_model("llama")
    tok = make_tiny_tokenizer()
    settings = parse_method("kvquant-3bit:plain:sink4")
    first = resolve_recipe(model, tok, settings, calib_data=str(text_file), calib_windows=2, calib_seqlen=64, progress=False)
    assert len(list((cache / "recipes").iterdir())) == 1
    cal = sys.modules["kvpack.recipes.calibrate"]

    def boom(*args, **kwargs):
        raise AssertionError("recalibrated although cached")

    monkeypatch.setattr(cal, "calibrate_windows", boom)
    second = resolve_recipe(model, tok, settings, calib_data=str(text_file), calib_windows=2, calib_seqlen=64, progress=False)
    x = torch.randn(1, 2, 10, 16)
    assert torch.equal(first.value_codecs[1].roundtrip(x)[0], second.value_codecs[1].roundtrip(x)[0])
    windowed = resolve_recipe(model, tok, parse_method("kvquant-3bit:plain:sink4:recent8"), calib_data=str(text_file),
                              calib_windows=2, calib_seqlen=64, progress=False)  # a recent window: the same recipe
    assert windowed.settings.recent_tokens == 8 and windowed.method == "kvquant-3bit:plain:sink4:recent8"
    assert torch.equal(first.value_codecs[1].roundtrip(x)[0], windowed.value_codecs[1].roundtrip(x)[0])
    with pytest.raises(AssertionError, match="recalibrated"):  # other settings: another cache entry
        resolve_recipe(model, tok, parse_method("kvquant-3bit:plain:sink1"), calib_data=str(text_file), calib_windows=2,
                       calib_seqlen=64, progress=False)


def test_post_rope_and_key_token_ablations(text_file):
    model = make_tiny_model("llama")
    tok = make_tiny_tokenizer()
    recipe = kvpack.calibrate(model, tok, "kvquant-3bit-1pct:post-rope:key-token:uniform:sink0", data=str(text_file),
                              windows=2, seqlen=64, progress=False)
    assert not recipe.settings.pre_rope and recipe.key_codecs[0].axis == "token"
    assert torch.allclose(recipe.key_codecs[0].levels[0].float(), torch.linspace(-1, 1, 8), atol=1e-3)
    ids = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(2))
    assert simulated_perplexity(model, ids, recipe, progress=False).ppl < 1000


def test_too_little_data(text_file):
    with pytest.raises(kvpack.KVPackError, match="holds only"):
        kvpack.calibrate(make_tiny_model("llama"), make_tiny_tokenizer(), "kvquant-3bit", data=str(text_file), windows=50, seqlen=64)


def test_method_names_and_options():
    s = parse_method("kvquant-3bit-1pct")
    assert (s.bits, s.key_axis, s.value_axis, s.pre_rope, s.sink_tokens) == (3, "channel", "token", True, 1)
    assert s.options.outlier_frac == 0.01 and s.options.weighting == "fisher" and not s.options.qnorm
    assert parse_method("kvquant-2bit").options.qnorm is True
    s = parse_method("kvquant-3bit-1pct:out0.5:out-matrix:fisher-s2:no-qnorm:cb-head:vspan-head:sink4:post-rope:key-token")
    assert s.options == KVQuantOptions(outlier_frac=0.005, weighting="fisher-s2", outlier_scope="matrix", qnorm=False,
                                       codebook="head", value_span="head", alloc="none", min_bits=1)
    assert parse_method("kvquant-3bit:alloc-global:minbits0").options.alloc == "global"
    assert (s.sink_tokens, s.pre_rope, s.key_axis) == (4, False, "token")
    for bad in ("kvquant-9bit", "kvquant-3bit-60pct", "kvquant-3bit:out70", "kvquant-3bit:bogus", "kvquant-3"):
        with pytest.raises(MethodError):
            parse_method(bad)


def test_cli_calibrate(text_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import kvpack.hf.models
    from kvpack.cli.app import app

    model = make_tiny_model("llama")
    monkeypatch.setattr(kvpack.hf.models, "load_model", lambda spec: (model, make_tiny_tokenizer()))
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["calibrate", "--model", "tiny", "--method", "kvquant-2bit-1pct", "--data", str(text_file),
                                      "--windows", "2", "--seqlen", "64", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert Recipe.load(out, model).method == "kvquant-2bit-1pct"
    bad = CliRunner().invoke(app, ["calibrate", "--model", "tiny", "--method", "kvquant-2bit:nope", "--data", str(text_file),
                                   "--out", str(out)])
    assert bad.exit_code == 2 and "Unknown method option" in bad.output


def test_alloc_layer_mixes_widths_per_tensor_at_the_exact_mean(text_file):
    """alloc-layer: one width per layer's K and V, mean exactly N over the model, plain one-width codecs."""
    model = make_tiny_model("llama")
    tok = make_tiny_tokenizer()
    recipe = kvpack.calibrate(model, tok, "kvquant-3bit-1pct:alloc-layer:fisher-s2", data=str(text_file), windows=3,
                              seqlen=64, progress=False)
    codecs = recipe.key_codecs + recipe.value_codecs
    widths = [c.bits for c in codecs]
    assert all(c.channel_bits is None and c.codebooks == "layer" for c in codecs)
    assert sum(widths) == 3 * len(widths) and all(1 <= w <= 5 for w in widths)
    assert recipe.calibration["mean_bits"]["keys"] == [c.bits for c in recipe.key_codecs]


def test_kvpack_presets_are_kvquant_configurations():
    settings = parse_method("kvpack-3bit")
    assert settings.family == "kvquant" and settings.bits == 3 and settings.name == "kvpack-3bit"
    assert settings.options.alloc == "global" and settings.options.weighting == "fisher-s2"
    assert settings.options.budget_tokens == 2048 and settings.options.qnorm
    assert settings.options.outlier_frac == pytest.approx(0.01)
    assert parse_method("kvpack-2bit:sink4").sink_tokens == 4
    with pytest.raises(MethodError, match="kvpack-<N>bit"):
        parse_method("kvpack-3.5bit")


def test_rows_split_fixed_and_marginal_bits(text_file):
    model = make_tiny_model("llama")
    tok = make_tiny_tokenizer()
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    fp16 = simulated_perplexity(model, ids, Recipe.baseline("fp16", 2), progress=False)
    assert fp16.fixed_bytes == 0 and fp16.marginal_bits_per_element == fp16.bits_per_element == 16
    recipe = kvpack.calibrate(model, tok, "kvquant-3bit-1pct", data=str(text_file), windows=2, seqlen=64, progress=False)
    q = simulated_perplexity(model, ids, recipe, progress=False)
    shared = sum(c.shared_nbytes() for c in recipe.key_codecs + recipe.value_codecs)
    assert q.fixed_bytes == shared > 0
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    elements = 2 * 2 * 64 * model.config.num_key_value_heads * head_dim  # one window: layers x (K, V) x tokens x heads x dim
    # per window: everything = marginal + the shared bytes amortized over one window's elements
    assert q.bits_per_element == pytest.approx(q.marginal_bits_per_element + 8 * shared / elements, rel=1e-6)
