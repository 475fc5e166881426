"""Shipped recipes: the packaged manifest and files, and when resolution uses them (tiny models)."""
import json

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.errors import DataError, RecipeError
from kvpack.methods import parse_method
from kvpack.recipes import bundled
from kvpack.recipes.bundled import read_manifest, shipped_recipe, verify, write_manifest
from kvpack.recipes.calibrate import calibrate
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.resolve import resolve_recipe

METHOD = "kvquant-2bit-1pct"


@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (600,), generator=g)))
    return path


@pytest.fixture
def shipped(tmp_path, text_file, one_thread):
    """A shipped-recipe folder for the tiny llama, built the way `kvpack calibrate --manifest` builds it."""
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    recipe = calibrate(model, tok, METHOD, data=str(text_file), windows=2, seqlen=64, progress=False)
    folder = tmp_path / "shipped"
    recipe.save(folder / METHOD)
    write_manifest(folder, [recipe], model, "tiny", "600 random words", argv=["kvpack", "calibrate", "--manifest"])
    return folder, model, tok, str(text_file)


def test_the_package_ships_the_demo_presets():
    manifest = read_manifest()
    assert {"kvquant-4bit-1pct", "kvquant-3bit-1pct"} <= set(manifest["recipes"])
    for name, entry in manifest["recipes"].items():
        recipe = Recipe.load(verify(entry))
        assert recipe.method == name and recipe.num_layers == 30
        assert entry["model"] == "smollm2-135m" and entry["command"].startswith("kvpack calibrate")
        assert (entry["data"]["spec"], entry["data"]["windows"], entry["data"]["seqlen"]) == ("c4[:500]", 16, 2048)
        assert recipe.calibration["tokens_sha256"] == entry["data"]["tokens_sha256"]
        assert entry["bytes"] < 2 * 2**20


def test_used_only_for_the_same_model_method_and_calibration(shipped):
    folder, model, tok, data = shipped
    settings = parse_method(METHOD)
    recipe = shipped_recipe(model, settings, data, 2, 64, folder=folder)
    assert recipe is not None and recipe.method == METHOD and recipe.calibration["data"] == data
    assert shipped_recipe(model, settings, data, 3, 64, folder=folder) is None  # other window count
    assert shipped_recipe(model, settings, "self", 2, 64, folder=folder) is None  # other data
    assert shipped_recipe(model, parse_method(METHOD + ":sink4"), data, 2, 64, folder=folder) is None
    windowed = shipped_recipe(model, parse_method(METHOD + ":recent16"), data, 2, 64, folder=folder)  # a serving choice
    assert windowed.method == METHOD + ":recent16" and windowed.settings.recent_tokens == 16
    assert all(torch.equal(a.level_data, b.level_data) for a, b in zip(windowed.key_codecs, recipe.key_codecs))
    assert shipped_recipe(model, parse_method("kvquant-3bit-1pct"), data, 2, 64, folder=folder) is None
    assert shipped_recipe(make_tiny_model("llama", seed=1), settings, data, 2, 64, folder=folder) is None  # other weights
    assert shipped_recipe(make_tiny_model("qwen2"), settings, data, 2, 64, folder=folder) is None  # other architecture


def test_damaged_file_names_the_fix(shipped):
    folder, model, tok, data = shipped
    tensors = folder / METHOD / "codecs.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RecipeError, match="--recalibrate"):
        shipped_recipe(model, parse_method(METHOD), data, 2, 64, folder=folder)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["recipes"][METHOD]["command"] == "kvpack calibrate --manifest"


def test_resolution_prefers_shipped_and_recalibrate_skips_it(shipped, monkeypatch, tmp_path):
    folder, model, tok, data = shipped
    monkeypatch.setattr(bundled, "SHIPPED_DIR", folder)
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path / "cache"))
    saved = json.loads((folder / METHOD / "recipe.json").read_text())
    (tmp_path / "calib.txt").unlink()  # the data is gone: only the shipped recipe can answer
    recipe = resolve_recipe(model, tok, METHOD, calib_data=data, calib_windows=2, calib_seqlen=64, progress=False)
    assert recipe.calibration["tokens_sha256"] == saved["calibration"]["tokens_sha256"]
    with pytest.raises(DataError):
        resolve_recipe(model, tok, METHOD, calib_data=data, calib_windows=2, calib_seqlen=64, progress=False, recalibrate=True)


@pytest.mark.slow
def test_default_model_resolves_the_shipped_recipe(smollm2, monkeypatch, tmp_path):
    model, tok = smollm2
    monkeypatch.setenv("KVPACK_DATA", str(tmp_path))  # no corpora: calibration is impossible
    recipe = resolve_recipe(model, tok, "kvquant-3bit-1pct", progress=False)
    assert recipe.calibration["data"] == "c4[:500]" and recipe.calibration["windows"] == 16


def test_recipe_for_finds_the_shipped_recipe_of_a_bfloat16_model_without_corpora(smollm2, monkeypatch, tmp_path):
    """A recipe belongs to the weights, not to the dtype they are loaded in: kvpack.recipe_for finds it."""
    import copy

    import kvpack

    model, tok = smollm2
    monkeypatch.setenv("KVPACK_DATA", str(tmp_path))  # no corpora: calibration is impossible
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path / "cache"))  # nor a cached recipe to fall back on
    for dtype in (torch.bfloat16, torch.float16):
        twin = copy.deepcopy(model).to(dtype)
        recipe = kvpack.recipe_for(twin, tok, "kvpack-3bit", progress=False)
        assert recipe.method == "kvpack-3bit" and recipe.calibration["data"] == "c4[:500]"


def test_weights_probe_tells_checkpoints_apart_but_not_dtypes(one_thread):
    from kvpack.recipes.io import same_weights, weights_probe

    model = make_tiny_model("llama")
    probe = weights_probe(model)
    assert same_weights(probe, weights_probe(model.to(torch.bfloat16).float()))
    other = make_tiny_model("llama", seed=1)
    assert not same_weights(probe, weights_probe(other))
    nudged = make_tiny_model("llama")
    weight = nudged.model.layers[0].self_attn.k_proj.weight
    weight.data += 0.02 * weight.std() * torch.randn_like(weight)  # a light fine-tune of the same checkpoint
    assert not same_weights(probe, weights_probe(nudged))
