"""The held-out check of a kvpack preset's switches (recipes/select.py): split, candidates, decision, metadata,
on tiny random models of several shapes (head_dim 64..256, 1..8 KV heads, sliding-window layers)."""
import importlib
from dataclasses import asdict

import pytest
import torch
from typer.testing import CliRunner

import kvpack
from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.cli.app import app
from kvpack.evaluate.perplexity import simulated_perplexity
from kvpack.methods import family_named, parse_method
from kvpack.methods.kvpack.switches import active_switches, candidates, fit_key, without_qnorm
from kvpack.recipes.calibrate import cache_key
from kvpack.recipes.collect import collect_activations
from kvpack.recipes.recipe import Recipe

calibrate_module = importlib.import_module("kvpack.recipes.calibrate")
select = importlib.import_module("kvpack.recipes.select")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (1200,), generator=g)))
    return path


@pytest.fixture(autouse=True)
def fresh_collection():
    calibrate_module.forget_collection()
    yield
    calibrate_module.forget_collection()


def _calibrate(model, text_file, method="kvpack-3bit", windows=4, progress=False):
    return kvpack.calibrate(model, make_tiny_tokenizer(), method, data=str(text_file), windows=windows, seqlen=64,
                            progress=progress)


def test_heldout_count_is_a_quarter_and_at_least_one():
    assert [select.heldout_count(n) for n in (1, 2, 3, 4, 7, 8, 16)] == [0, 1, 1, 1, 1, 2, 4]


def test_split_activations_are_those_of_the_fit_windows():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(3))
    every, _ = collect_activations(model, ids, fisher=True, progress=False)
    first, _ = collect_activations(model, ids[:3], fisher=True, progress=False)
    split = select.split_activations(every, 4, 3)
    for got, want in zip(split, first):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert torch.equal(got.heads, want.heads)
        torch.testing.assert_close(got.key_fisher, want.key_fisher)
        torch.testing.assert_close(got.value_fisher, want.value_fisher)
    with pytest.raises(ValueError, match="do not split"):
        select.split_activations(every, 5, 3)


def test_candidates_are_every_subset_and_reparse_to_their_settings():
    settings = parse_method("kvpack-3bit")
    found = candidates(settings)
    assert len(found) == 8 and found[0].switches == () and found[-1].settings == settings
    for cand in found:
        assert asdict(parse_method(cand.settings.name)) == asdict(cand.settings)
    faithful = parse_method("kvquant-3bit-1pct")
    assert asdict(found[0].settings.options) == asdict(faithful.options)
    # Q-Norm is the faithful 2-bit configuration's own: not a switch there
    assert active_switches(parse_method("kvpack-2bit")) == ("fisher-s2", "alloc-global")
    assert parse_method(candidates(parse_method("kvpack-2bit"))[0].settings.name).options.qnorm
    # a switch the name turns off is not a candidate
    assert active_switches(parse_method("kvpack-4bit:alloc-none")) == ("fisher-s2", "qnorm")


def test_a_candidate_without_qnorm_is_its_twin_with_qnorm_dropped():
    """The shared fit: dropping Q-Norm from a fitted codec gives what fitting without Q-Norm gives."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (3, 64), generator=torch.Generator().manual_seed(4))
    acts, _ = collect_activations(model, ids, fisher=True, progress=False)
    by_switches = {c.switches: c for c in candidates(parse_method("kvpack-3bit:budget48"))}
    with_q, without_q = by_switches["fisher-s2", "alloc-global", "qnorm"], by_switches["fisher-s2", "alloc-global"]
    assert fit_key(with_q) == fit_key(without_q)
    fit = family_named("kvquant").fit
    k_q, v_q, _ = fit(model, acts, with_q.settings, progress=False)
    k_plain, v_plain, _ = fit(model, acts, without_q.settings, progress=False)
    assert k_q[0].qnorm is not None
    x = torch.randn(1, model.config.num_key_value_heads, 20, 16, generator=torch.Generator().manual_seed(5))
    for got, want in zip(k_q + v_q, k_plain + v_plain):
        stripped = without_qnorm(got)
        assert stripped.qnorm is None and torch.equal(stripped.levels, want.levels)
        assert torch.equal(stripped.channel_bits, want.channel_bits)
        torch.testing.assert_close(stripped.roundtrip(x)[0], want.roundtrip(x)[0])


def test_the_choice_is_recorded_never_worse_than_faithful_and_refitted_on_all_windows(text_file, tmp_path, capsys):
    model = make_tiny_model("llama")
    recipe = _calibrate(model, text_file, progress=True)
    record = recipe.calibration["selection"]
    assert record["fit_windows"] == [0, 1, 2] and record["heldout_windows"] == [3] and record["heldout_tokens"] == 63
    rows = record["candidates"]
    assert len(rows) == 8 and rows[0]["switches"] == [] and rows[-1]["method"] == "kvpack-3bit"
    best = min(rows, key=lambda r: (r["kl"], len(r["switches"])))
    assert record["method"] == best["method"] and record["kept"] == best["switches"]
    assert best["kl"] <= rows[0]["kl"]
    assert sorted(record["kept"] + record["dropped"]) == sorted(["fisher-s2", "alloc-global", "qnorm"])
    assert "selection" in recipe.calibration["timing_s"]
    # the recipe keeps the preset's name; its codecs are the chosen configuration fitted on all four windows
    assert recipe.settings.name == "kvpack-3bit"
    ids = calibrate_module.calibration_windows(make_tiny_tokenizer(), str(text_file), 4, 64)
    acts, _ = collect_activations(model, ids, fisher=True, progress=False)
    keys, values, _ = family_named("kvquant").fit(model, acts, parse_method(record["method"]), progress=False)
    for got, want in zip(recipe.key_codecs + recipe.value_codecs, keys + values):
        assert torch.equal(got.levels, want.levels)
    err = capsys.readouterr().err
    assert "checking the switches of kvpack-3bit" in err and f"fits as {record['method']}" in err and "<- kept" in err
    loaded = Recipe.load(recipe.save(tmp_path / "r"), model)
    assert loaded.calibration["selection"] == record and loaded.method == "kvpack-3bit"


def test_a_switch_that_raises_the_heldout_loss_is_dropped(text_file, monkeypatch):
    real = select.score

    def fisher_s2_hurts(model, windows, fitted):
        real(model, windows, fitted)
        for scored, _ in fitted:
            scored.kl += 1.0 if "fisher-s2" in scored.candidate.switches else 0.0

    monkeypatch.setattr(select, "score", fisher_s2_hurts)
    recipe = _calibrate(make_tiny_model("llama"), text_file)
    record = recipe.calibration["selection"]
    assert "fisher-s2" in record["dropped"] and "fisher-s2" not in record["kept"]
    assert ":fisher" in record["method"]


def test_every_switch_kept_when_each_lowers_the_loss(text_file, monkeypatch):
    real = select.score

    def switches_help(model, windows, fitted):
        real(model, windows, fitted)
        for scored, _ in fitted:
            scored.kl += 1.0 - 0.1 * len(scored.candidate.switches)

    monkeypatch.setattr(select, "score", switches_help)
    recipe = _calibrate(make_tiny_model("llama"), text_file, method="kvpack-3bit:budget48")
    record = recipe.calibration["selection"]
    assert record["method"] == "kvpack-3bit:budget48" and record["dropped"] == []
    assert all(c.channel_bits is not None and c.qnorm is not None for c in recipe.key_codecs)


def test_per_channel_widths_that_hurt_are_dropped_on_a_short_budget(text_file):
    """budget48 pays every channel's codebook from 48 tokens of codes: on the tiny model the per-channel widths
    lose to one width, and the check drops them."""
    recipe = _calibrate(make_tiny_model("llama"), text_file, method="kvpack-3bit:budget48")
    rows = {tuple(r["switches"]): r["kl"] for r in recipe.calibration["selection"]["candidates"]}
    for switches, kl in rows.items():
        if "alloc-global" in switches:
            assert kl > rows[tuple(s for s in switches if s != "alloc-global")]
    assert "alloc-global" in recipe.calibration["selection"]["dropped"]
    assert all(c.channel_bits is None for c in recipe.key_codecs + recipe.value_codecs)


def test_one_window_skips_the_check_and_says_so(text_file):
    recipe = _calibrate(make_tiny_model("llama"), text_file, windows=1)
    record = recipe.calibration["selection"]
    assert "nothing to hold out" in record["skipped"] and record["method"] == "kvpack-3bit"
    assert record["kept"] == ["fisher-s2", "alloc-global", "qnorm"]
    assert all(c.channel_bits is not None for c in recipe.key_codecs)


def test_only_presets_are_checked_and_their_cache_key_says_so(text_file, monkeypatch):
    model = make_tiny_model("llama")
    recipe = _calibrate(model, text_file, method="kvquant-3bit-1pct:fisher-s2:alloc-global:qnorm")
    assert "selection" not in recipe.calibration
    ids = torch.zeros(2, 8, dtype=torch.int64)
    preset, plain = parse_method("kvpack-3bit"), parse_method("kvquant-3bit-1pct")
    before = cache_key(model, preset, ids), cache_key(model, plain, ids)
    monkeypatch.setattr(calibrate_module, "SELECTION_VERSION", calibrate_module.SELECTION_VERSION + 1)
    assert cache_key(model, preset, ids) != before[0] and cache_key(model, plain, ids) == before[1]


SHAPES = [  # (architecture, attention, config overrides): head_dim 64..256, 1..8 KV heads, sliding windows
    ("llama", "sdpa", dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1)),
    ("llama", "sdpa", dict(head_dim=128, num_attention_heads=8, num_key_value_heads=8)),
    ("mistral", "sdpa", dict(head_dim=64, num_attention_heads=4, num_key_value_heads=4, sliding_window=16)),
    ("gemma2", "eager", dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
                             layer_types=["sliding_attention", "full_attention"])),
]


@pytest.mark.parametrize("arch,attn,overrides", SHAPES, ids=["d64-kv1", "d128-kv8", "mistral-swa", "gemma2-d256-kv1-swa"])
def test_shapes(arch, attn, overrides, text_file):
    model = make_tiny_model(arch, attn, **overrides)
    recipe = _calibrate(model, text_file)
    record = recipe.calibration["selection"]
    rows = record["candidates"]
    assert len(rows) == 8 and all(r["kl"] >= 0 and r["nll"] > 0 for r in rows)
    assert min(r["kl"] for r in rows) == pytest.approx(next(r["kl"] for r in rows if r["method"] == record["method"]))
    assert next(r["kl"] for r in rows if r["method"] == record["method"]) <= rows[0]["kl"]
    heads, dim = overrides["num_key_value_heads"], overrides["head_dim"]
    assert recipe.key_codecs[0].heads == heads and recipe.key_codecs[0].head_dim == dim
    ids = torch.randint(3, 120, (1, 64), generator=torch.Generator().manual_seed(6))
    assert simulated_perplexity(model, ids, recipe, progress=False).kl < 0.05


def test_cli_calibrate_prints_and_saves_the_decision(text_file, tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    monkeypatch.setattr(importlib.import_module("kvpack.hf.models"), "load_model", lambda spec: (model, make_tiny_tokenizer()))
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["calibrate", "--model", "tiny", "--method", "kvpack-3bit", "--data", str(text_file),
                                      "--windows", "4", "--seqlen", "64", "--out", str(out), "--progress"])
    assert result.exit_code == 0, result.output
    record = Recipe.load(out, model).calibration["selection"]
    assert f"kvpack-3bit fits as {record['method']}" in result.output and "<- kept" in result.output
