"""Method names -> settings -> recipes, the fp16 split of the simulator, and bit counting."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.methods import Family, baselines, needs_calibration, registry
from kvpack.codecs import Fp16Codec, NormalFloatCodec, UniformCodec
from kvpack.errors import KVPackError, MethodError
from kvpack.methods import MethodSettings, parse_method

BASELINE_PRESETS = baselines.FAMILY.presets
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.simulate import BitCount, Simulator, fp16_split

pytestmark = pytest.mark.usefixtures("one_thread")

# --- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", BASELINE_PRESETS)
def test_every_preset_parses_and_builds(preset):
    s = parse_method(preset)
    assert s.name == preset
    recipe = Recipe.baseline(preset, 3)
    assert recipe.method == preset and recipe.num_layers == 3
    assert len(recipe.value_codecs) == 3


def test_preset_settings():
    assert parse_method("fp16") == MethodSettings(name="fp16", family="fp16")
    int4 = parse_method("int4")
    assert (int4.family, int4.bits, int4.key_axis, int4.value_axis, int4.key_group, int4.value_group) == ("int", 4, "token", "token", None, None)
    assert (int4.pre_rope, int4.sink_tokens, int4.recent_tokens) == (False, 0, 0)
    nf3 = parse_method("nf3")
    assert (nf3.family, nf3.bits) == ("nf", 3)
    kivi = parse_method("kivi-2")
    assert (kivi.family, kivi.bits, kivi.key_axis, kivi.value_axis) == ("kivi", 2, "channel", "token")
    assert (kivi.key_group, kivi.value_group, kivi.recent_tokens, kivi.sink_tokens, kivi.pre_rope) == (32, 32, 128, 0, False)
    assert parse_method("kivi-4").bits == 4
    assert parse_method("  int8 ").name == "int8"


@pytest.mark.parametrize("bits", range(2, 9))
def test_any_int_and_nf_width(bits):
    assert parse_method(f"int{bits}").bits == bits
    assert parse_method(f"nf{bits}").bits == bits


# --- options and CLI flags -------------------------------------------------------------------------


def test_options():
    s = parse_method("int4:pre-rope:key-channel")
    assert s.pre_rope and s.key_axis == "channel" and s.value_axis == "token"
    assert s.name == "int4:pre-rope:key-channel"
    g = parse_method("nf3:g32")
    assert (g.key_group, g.value_group) == (32, 32)
    sink = parse_method("kivi-2:sink1")
    assert sink.sink_tokens == 1 and sink.recent_tokens == 128
    r = parse_method("int2:recent0:sink4")
    assert (r.recent_tokens, r.sink_tokens) == (0, 4)
    assert parse_method("kivi-2:recent64").recent_tokens == 64
    assert parse_method("kivi-2:key-token").key_axis == "token"
    assert parse_method("int4:pre-rope:post-rope").pre_rope is False  # later options win


def test_cli_flags():
    s = parse_method("int4", pre_rope=True)
    assert s.pre_rope and s.name == "int4:pre-rope"
    s = parse_method("int4", key_axis="channel")
    assert s.key_axis == "channel" and s.name == "int4:key-channel"
    # flags apply before the method's own options
    assert parse_method("int4:post-rope", pre_rope=True).pre_rope is False
    assert parse_method("int4:key-token", key_axis="channel").key_axis == "token"
    # None leaves the preset's own default
    assert parse_method("kivi-2", pre_rope=None, key_axis=None) == parse_method("kivi-2")


def test_flag_that_changes_a_preset_is_visible_in_its_name():
    # kivi keys are per-channel by default; --key-axis token makes a different method,
    # which must not be reported under the plain preset name
    s = parse_method("kivi-2", key_axis="token")
    assert s.key_axis == "token"
    assert s.name != "kivi-2"
    assert parse_method(s.name) == s


OPTIONS = ["pre-rope", "post-rope", "key-channel", "key-token", "g8", "g32", "sink0", "sink1", "sink4", "recent0", "recent64", "recent128"]


@given(
    preset=st.sampled_from(BASELINE_PRESETS),
    options=st.lists(st.sampled_from(OPTIONS), max_size=5),
    pre_rope=st.sampled_from([None, True, False]),
    key_axis=st.sampled_from([None, "token", "channel"]),
)
@settings(max_examples=400, deadline=None)
def test_name_reparses_to_the_same_settings(preset, options, pre_rope, key_axis):
    """A method's name is a complete description: results labelled with it can be reproduced."""
    s = parse_method(":".join([preset, *options]), pre_rope=pre_rope, key_axis=key_axis)
    again = parse_method(s.name)
    assert again == s
    assert parse_method(again.name).name == s.name  # canonical: stable under re-parsing


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("", "Empty method"),
        ("   ", "Empty method"),
        ("int1", r"int1.*2\.\.8"),
        ("int9", r"int9.*2\.\.8"),
        ("nf1", r"2\.\.8"),
        ("nf9", r"2\.\.8"),
        ("kivi-8", r"kivi-8.*2\.\.4"),
        ("kivi-1", r"2\.\.4"),
        ("int", "needs a bit width"),
        ("nf", "needs a bit width"),
        ("kivi-", "needs a bit width"),
        ("fp16x", "Unknown method 'fp16x'"),
        ("fp32", "Unknown method 'fp32'"),
        ("int4bit", "Unknown method"),
        ("kivi2", "Unknown method"),
        ("gptq", r"Unknown method 'gptq'.*Known presets \(baseline: fp16, int8"),
        ("int4:bogus", "Unknown method option 'bogus'.*pre-rope"),
        ("int4:", "Unknown method option ''"),
        ("int4:g0", "group size must be >= 1"),
        ("int4:gx", "Unknown method option 'gx'"),
        ("int4:sink-1", "Unknown method option 'sink-1'"),
        ("int4:PRE-ROPE", "Unknown method option"),
    ],
)
def test_method_errors(text, pattern):
    with pytest.raises(MethodError, match=pattern) as info:
        parse_method(text)
    assert isinstance(info.value, KVPackError)  # the CLI prints these cleanly


def test_bad_key_axis_flag():
    with pytest.raises(MethodError, match="--key-axis must be 'token' or 'channel', got 'head'"):
        parse_method("int4", key_axis="head")


def test_fp16_takes_no_bits():
    with pytest.raises(MethodError, match="fp16 takes no bit width"):
        parse_method("fp168")


def test_group_that_does_not_divide_head_dim_is_reported():
    recipe = Recipe.baseline("int4:g48", 1)
    with pytest.raises((ValueError, MethodError), match="head_dim 64 is not divisible .* 48"):
        Simulator(recipe)(0, torch.randn(1, 1, 8, 64), torch.randn(1, 1, 8, 64))


# --- recipes ---------------------------------------------------------------------------------------


def codec_desc(codec):
    if isinstance(codec, Fp16Codec):
        return ("fp16",)
    kind = "nf" if isinstance(codec, NormalFloatCodec) else "int"
    assert isinstance(codec, (UniformCodec, NormalFloatCodec))
    return (kind, codec.bits, codec.axis, codec.group_size)


@pytest.mark.parametrize(
    "method,key,value",
    [
        ("fp16", ("fp16",), ("fp16",)),
        ("int4", ("int", 4, "token", None), ("int", 4, "token", None)),
        ("int3:key-channel", ("int", 3, "channel", None), ("int", 3, "token", None)),
        ("int2:g32", ("int", 2, "token", 32), ("int", 2, "token", 32)),
        ("nf4", ("nf", 4, "token", None), ("nf", 4, "token", None)),
        ("nf3:key-channel:g16", ("nf", 3, "channel", 16), ("nf", 3, "token", 16)),
        ("kivi-2", ("int", 2, "channel", 32), ("int", 2, "token", 32)),
        ("kivi-4", ("int", 4, "channel", 32), ("int", 4, "token", 32)),
    ],
)
def test_recipe_baseline_codecs(method, key, value):
    recipe = Recipe.baseline(method, 4)
    assert recipe.num_layers == 4
    assert all(codec_desc(c) == key for c in recipe.key_codecs)
    assert all(codec_desc(c) == value for c in recipe.value_codecs)


def test_recipe_from_settings_object():
    s = parse_method("int4", pre_rope=True)
    recipe = Recipe.baseline(s, 2)
    assert recipe.settings is s and recipe.method == "int4:pre-rope"


def test_recipe_refuses_calibrated_family(monkeypatch):
    class Fake(Family):
        name = "fakecal"
        calibrated = True

        def matches(self, preset):
            return preset.startswith("fakecal-")

        def settings(self, preset):
            return MethodSettings(name=preset, family="fakecal", bits=3, pre_rope=True)

    monkeypatch.setattr(registry, "_FAMILIES", [Fake(), *registry._FAMILIES])
    s = parse_method("fakecal-3")
    assert s.family == "fakecal" and s.pre_rope
    assert needs_calibration(s)
    assert not needs_calibration(parse_method("int4"))
    with pytest.raises(MethodError, match="needs calibration"):
        Recipe.baseline("fakecal-3", 2)
    with pytest.raises(MethodError, match="needs calibration"):
        registry.family_named("fakecal").codecs(s)


# --- the fp16 split --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens,sink,recent,group,expected",
    [
        (10, 0, 0, 1, (0, 10)),
        (10, 1, 0, 1, (1, 10)),
        (10, 1, 3, 1, (1, 7)),
        (10, 20, 0, 1, (10, 10)),  # shorter than the sink: nothing quantized
        (100, 0, 128, 32, (0, 0)),  # shorter than the recent window
        (2048, 0, 128, 32, (0, 1920)),
        (2000, 0, 128, 32, (0, 1856)),  # 1872 rounded down to whole groups of 32
        (2000, 0, 128, 1, (0, 1872)),
        (2048, 1, 128, 32, (1, 1889)),  # whole groups counted from the first quantized token
        (40, 4, 0, 16, (4, 36)),
        (40, 4, 0, 0, (4, 40)),  # a token group of 0 means 1
    ],
)
def test_fp16_split_cases(tokens, sink, recent, group, expected):
    assert fp16_split(tokens, sink, recent, group) == expected


@given(st.integers(0, 5000), st.integers(0, 64), st.integers(0, 512), st.integers(1, 128))
@settings(max_examples=500, deadline=None)
def test_fp16_split_properties(tokens, sink, recent, group):
    start, stop = fp16_split(tokens, sink, recent, group)
    assert 0 <= start <= stop <= tokens
    assert start == min(sink, tokens)  # the sink is never quantized
    assert (stop - start) % group == 0  # only whole token groups
    assert tokens - stop >= min(recent, tokens - start)  # the recent window stays in fp16
    assert stop + group > max(start, tokens - recent)  # and no further whole group would fit


# --- bit counting ----------------------------------------------------------------------------------


def test_bitcount():
    c = BitCount()
    assert c.per_element == 0.0
    c.add(100.0, 10)
    c.add(60.0, 10)
    c.add(8.0, 0)
    assert (c.bits, c.elements) == (168.0, 20)
    assert c.per_element == pytest.approx(8.4)


def run_simulator(method: str, tokens: int, layers: int = 2, head_dim: int = 64, heads: int = 2):
    recipe = Recipe.baseline(method, layers)
    sim = Simulator(recipe)
    g = torch.Generator().manual_seed(tokens)
    outs = []
    for layer in range(layers):
        k = torch.randn(1, heads, tokens, head_dim, generator=g)
        v = torch.randn(1, heads, tokens, head_dim, generator=g)
        outs.append(((k, v), sim(layer, k, v)))
    return sim, outs


def test_kivi2_bits_at_2048_by_hand():
    sim, _ = run_simulator("kivi-2", 2048, head_dim=64)
    # 1920 quantized tokens, 128 fp16 tokens, per channel (keys) or per token (values):
    # keys: 2-bit codes + fp16 min/step per 32 tokens: 1920*2 + 60*32 ; fp16 tail 128*16
    # values: 2-bit codes + fp16 min/step per 32 channels (=1 bit/elem): 1920*(2+1) ; tail 128*16
    key_bits = 1920 * 2 + (1920 // 32) * 32 + 128 * 16
    value_bits = 1920 * (2 + 32 / 32) + 128 * 16
    expected = (key_bits + value_bits) / (2 * 2048)
    assert expected == 3.8125
    assert sim.count.per_element == expected
    assert sim.count.elements == 2 * 2 * (2 * 2048 * 64)  # layers x (K, V) x elements


def test_kivi2_bits_with_a_partial_group():
    sim, _ = run_simulator("kivi-2", 2000, head_dim=64)
    key_bits = 1856 * 3 + 144 * 16  # keys: whole groups of 32 tokens only
    value_bits = 1872 * 3 + 128 * 16  # values are per token: everything before the recent window
    assert sim.count.per_element == pytest.approx((key_bits + value_bits) / 4000, rel=1e-12)


@pytest.mark.parametrize(
    "method,expected",
    [
        ("fp16", 16.0),
        ("int4", 4 + 32 / 64),
        ("int2", 2 + 32 / 64),
        ("int8:g32", 8 + 1),
        ("nf3", 3 + 32 / 64),
        ("int4:key-channel", (4 + 32 / 256 + 4 + 32 / 64) / 2),
        ("int4:sink1", (255 * (4 + 0.5) + 16) / 256),
        ("kivi-4", 16.0 * 128 / 256 + (4 + 1) * 128 / 256),
    ],
)
def test_simulator_bits(method, expected):
    sim, _ = run_simulator(method, 256, head_dim=64)
    assert sim.count.per_element == pytest.approx(expected, rel=1e-12)


def test_simulator_keeps_fp16_parts_and_quantizes_the_middle():
    sim, outs = run_simulator("kivi-2:sink2", 300, layers=1, head_dim=32)
    (k, v), (k_out, v_out) = outs[0]
    start, stop = fp16_split(300, 2, 128, 32)
    assert (start, stop) == (2, 162)
    codec = UniformCodec(2, "channel", 32)
    assert torch.equal(k_out[..., :start, :], k[..., :start, :].half().float())
    assert torch.equal(k_out[..., stop:, :], k[..., stop:, :].half().float())
    # a served window (the default): tokens leave the window as their fp16 copies and are encoded from them
    assert torch.equal(k_out[..., start:stop, :], codec.roundtrip(k[..., start:stop, :].half().float())[0])
    vcodec = UniformCodec(2, "token", 32)
    assert torch.equal(v_out[..., 2:172, :], vcodec.roundtrip(v[..., 2:172, :].half().float())[0])
    assert torch.equal(v_out[..., 172:, :], v[..., 172:, :].half().float())
    assert k_out.shape == k.shape and v_out.dtype == v.dtype
    window_end = Simulator(sim.recipe, served_window=False)  # one chunk: encoded from the keys as they came
    assert torch.equal(window_end(0, k, v)[0][..., start:stop, :], codec.roundtrip(k[..., start:stop, :])[0])


def test_simulator_short_sequence_is_all_fp16():
    sim, outs = run_simulator("kivi-2", 100, layers=1)
    (k, v), (k_out, v_out) = outs[0]
    assert torch.equal(k_out, k.half().float()) and torch.equal(v_out, v.half().float())
    assert sim.count.per_element == 16.0


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_method("int4").bits = 3


def test_channel_group_must_divide_head_dim():
    from conftest import make_tiny_model
    from kvpack.errors import MethodError
    from kvpack.recipes.resolve import check_settings_fit_model, resolve_recipe
    from kvpack.recipes.io import head_dim_of
    from kvpack.hf.models import text_config

    model = make_tiny_model("llama")
    dim = head_dim_of(text_config(model.config))
    bad = dim // 2 + 1 if dim > 2 else 3
    with pytest.raises(MethodError, match=f"head_dim {dim}"):
        resolve_recipe(model, None, f"int4:g{bad}")
    check_settings_fit_model(parse_method(f"int4:g{dim // 2}"), model)  # a divisor is fine


def test_fitted_settings_drop_only_the_recent_window():
    from kvpack.methods.settings import fitted_settings

    fitted = fitted_settings(parse_method("kvpack-3bit:recent16:sink4"))
    assert fitted.name == "kvpack-3bit:sink4" and fitted.recent_tokens == 0 and fitted.sink_tokens == 4
    assert fitted == fitted_settings(parse_method("kvpack-3bit:sink4"))
    assert fitted_settings(parse_method("kivi-2")).name == "kivi-2"  # a family default window goes too
