"""Recipe files: round trip, and a clear RecipeError for every way loading can go wrong."""
import json
import shutil

import pytest
import torch

from conftest import make_tiny_model
from kvpack.recipes.calibrate import calibrate_windows, cached_calibration
from kvpack.cache import CompressedCache
from kvpack.errors import RecipeError
from kvpack.methods.names import parse_method
from kvpack.recipes.recipe import Recipe
from kvpack.recipes.io import FORMAT_VERSION, JSON_NAME, TENSORS_NAME


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def recipe(model):
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    return calibrate_windows(model, ids, parse_method("kvquant-3bit-1pct:cb-head"), "random ids", progress=False)


@pytest.fixture
def saved(recipe, tmp_path):
    return recipe.save(tmp_path / "recipe")


def test_roundtrip(recipe, saved, model):
    loaded = Recipe.load(saved, model)
    assert loaded.settings == recipe.settings and loaded.settings.options == recipe.settings.options
    assert loaded.model_identity == recipe.model_identity
    assert loaded.calibration["data"] == "random ids" and "kmeans" in loaded.calibration["timing_s"]
    x = torch.randn(1, 2, 20, 16)
    for a, b in zip(recipe.key_codecs + recipe.value_codecs, loaded.key_codecs + loaded.value_codecs):
        assert torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))
    description = json.loads((saved / JSON_NAME).read_text())
    assert description["format_version"] == FORMAT_VERSION
    assert description["model"]["num_kv_heads"] == 2 and description["model"]["head_dim"] == 16
    assert description["layers"][0]["key"]["type"] == "NuqCodec"


def test_baseline_roundtrip(tmp_path, model):
    recipe = Recipe.baseline("int4:pre-rope:key-channel", 2)
    loaded = Recipe.load(recipe.save(tmp_path / "b"), model)
    assert loaded.settings == recipe.settings and type(loaded.key_codecs[0]).__name__ == "UniformCodec"


def test_missing_directory(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope")


def test_missing_json(saved):
    (saved / JSON_NAME).unlink()
    with pytest.raises(RecipeError, match="not a kvpack recipe"):
        Recipe.load(saved)


def test_missing_tensors(saved):
    (saved / TENSORS_NAME).unlink()
    with pytest.raises(RecipeError, match="missing"):
        Recipe.load(saved)


def test_truncated_tensors(saved):
    data = (saved / TENSORS_NAME).read_bytes()
    (saved / TENSORS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(RecipeError, match="truncated or altered"):
        Recipe.load(saved)


def test_altered_tensors(saved):
    data = bytearray((saved / TENSORS_NAME).read_bytes())
    data[-3] ^= 0xFF
    (saved / TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="truncated or altered"):
        Recipe.load(saved)


def test_corrupt_json(saved):
    (saved / JSON_NAME).write_text("{not json")
    with pytest.raises(RecipeError, match="damaged"):
        Recipe.load(saved)


def test_newer_format(saved):
    description = json.loads((saved / JSON_NAME).read_text())
    description["format_version"] = FORMAT_VERSION + 1
    (saved / JSON_NAME).write_text(json.dumps(description))
    with pytest.raises(RecipeError, match="Upgrade kvpack"):
        Recipe.load(saved)


@pytest.mark.parametrize("overrides,field", [
    (dict(num_hidden_layers=3), "num_layers"),
    (dict(num_key_value_heads=4), "num_kv_heads"),
    (dict(rope_theta=500.0), "config_sha256"),
])
def test_other_model(saved, overrides, field):
    other = make_tiny_model("llama", **overrides)
    with pytest.raises(RecipeError, match=f"calibrated for another model: .*not this model .*\\({field} is "):
        Recipe.load(saved, other)


def test_cache_refuses_a_recipe_for_another_model_with_the_same_layer_count(saved):
    """Refused when the cache is built, naming both models, not by a codec on the first forward."""
    other = make_tiny_model("llama", num_key_value_heads=4)
    recipe = Recipe.load(saved)
    with pytest.raises(RecipeError, match="calibrated for another model: .*2 KV heads.*not this model .*4 KV heads"):
        CompressedCache(other, recipe)


def test_a_file_is_not_a_recipe_folder(saved):
    with pytest.raises(RecipeError, match="is a file; a recipe is a folder"):
        Recipe.load(saved / JSON_NAME)


def test_other_architecture(saved):
    with pytest.raises(RecipeError, match="another model: .*\\(architecture is "):
        Recipe.load(saved, make_tiny_model("qwen2"))


def test_recipe_dir_for_another_method(saved, model):
    with pytest.raises(RecipeError, match="is for method 'kvquant-3bit-1pct:cb-head'"):
        cached_calibration(model, None, parse_method("kvquant-2bit"), recipe_dir=saved)
    assert cached_calibration(model, None, parse_method("kvquant-3bit-1pct:cb-head"), recipe_dir=saved).method == "kvquant-3bit-1pct:cb-head"


def test_save_replaces_cleanly(recipe, saved):
    recipe.save(saved)  # overwrite in place
    assert not list(saved.glob("*.tmp"))
    Recipe.load(saved)
    shutil.rmtree(saved)


def test_every_codec_type_is_registered_by_importing_kvpack_alone():
    """A recipe saved by one process must load in a fresh one that imported only kvpack (no family modules)."""
    import subprocess
    import sys

    code = "import kvpack.codecs as c; print(' '.join(sorted(c.CODEC_TYPES)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"NuqCodec", "RVQCodec", "UniformCodec", "CodebookCodec", "NormalFloatCodec", "Fp16Codec"} <= set(out)
