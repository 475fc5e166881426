"""Save and load a CompressedCache (prefix caching across processes).

One safetensors file: every stored tensor (fp16 heads/tails, the encoded runs, the position
log) plus a JSON header in the safetensors metadata (key "kvpack_cache"):
format name and version, a fingerprint of the model (config shape fields and a digest of the
first attention layer's k/v weights), a fingerprint of the recipe (settings and every codec's
state), the cache's own settings, per-layer layout, and a SHA-256 of all tensor bytes.
Loading checks each of these and raises CacheFileError naming what differs and what to do.
Writes go to a temporary file in the same folder, then an atomic rename.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from kvpack.cache.store import Run
from kvpack.cache.stream import TokenStream
from kvpack.errors import CacheFileError
from kvpack.hf.attention import attention_layers
from kvpack.hf.models import text_config
from safetensors.torch import save_file
from safetensors import safe_open

FORMAT = "kvpack-cache"
# 2: per-block lengths are int64 tensors ("<prefix>.run<j>.lengths", one row per tensor name in sorted order)
#    instead of JSON lists in the header (about 1 KB per generated token and layer made long caches unsavable);
# 1: lengths in the header (still read).
VERSION = 2
READABLE = (1, 2)
_META_KEY = "kvpack_cache"


def _digest_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model) -> dict:
    """Shape fields of the decoder config and a digest of layer 0's k_proj/v_proj weights."""
    cfg = text_config(model.config)
    fields = ["model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "hidden_size", "vocab_size", "sliding_window"]
    out = {f: getattr(cfg, f, None) for f in fields}
    out["rope"] = json.dumps(getattr(cfg, "rope_parameters", None), sort_keys=True, default=str)
    attn = attention_layers(model)[0]
    h = hashlib.sha256()
    for proj in ("k_proj", "v_proj"):
        _digest_tensor(h, getattr(attn, proj).weight.float())
    out["weights_sha256"] = h.hexdigest()
    return out


def recipe_fingerprint(recipe) -> str:
    """SHA-256 of the recipe's settings and every codec's state."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(recipe.settings), sort_keys=True, default=str).encode())
    for codec in [*recipe.key_codecs, *recipe.value_codecs]:
        config, tensors = codec.state()
        h.update(type(codec).__name__.encode())
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name in sorted(tensors):
            h.update(name.encode())
            _digest_tensor(h, tensors[name])
    return h.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        _digest_tensor(h, tensors[name])
    return h.hexdigest()


def _stream_state(prefix: str, s: TokenStream, tensors: dict) -> dict:
    head = s.head is not None
    tail = s.tail is not None
    if head:
        tensors[f"{prefix}.head"] = s.head.contiguous()
    if tail:
        tensors[f"{prefix}.tail"] = s.tail.contiguous()
    runs = []
    for j, run in enumerate(s.body.runs):
        run.compact()
        for name in run.buffers:
            tensors[f"{prefix}.run{j}.{name}"] = run.buffers[name].contiguous()
        names = sorted(run.buffers)
        tensors[f"{prefix}.run{j}.lengths"] = torch.tensor([run.lengths[n] for n in names], dtype=torch.int64)
        runs.append({"block_shape": list(run.block_shape), "meta": run.meta, "names": names})
    return {"head": head, "tail": tail, "dropped": s.dropped, "head_dropped": s.head_dropped, "runs": runs}


def save_cache(cache, path: str | Path) -> Path:
    """Write `cache` to `path` atomically; returns the path."""

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        if layer.k is None:
            layers.append(None)
            continue
        layers.append({"dtype": str(layer.dtype).removeprefix("torch."), "k": _stream_state(f"{i}.k", layer.k, tensors),
                       "v": _stream_state(f"{i}.v", layer.v, tensors)})
    if cache.positions is not None:
        tensors["positions"] = cache.positions.contiguous()
    tensors = {n: t.detach().cpu() for n, t in tensors.items()}
    header = {
        "format": FORMAT, "version": VERSION,
        "model": model_fingerprint(cache.model_ref),
        "recipe": {"method": cache.recipe.method, "fingerprint": recipe_fingerprint(cache.recipe)},
        "cache": {"sink_tokens": cache.sink_tokens, "recent_tokens": cache.recent_tokens, "left_pad": cache.left_pad,
                  "block_tokens": cache.block_tokens, "pre_rope": cache.pre_rope, "tokens": cache.get_seq_length()},
        "layers": layers,
        "checksum": _checksum(tensors),
    }
    try:
        meta = json.dumps(header)
    except TypeError as exc:
        raise CacheFileError(f"cannot save: a codec's block metadata is not JSON ({exc})") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={_META_KEY: meta})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CacheFileError(f"No saved cache at '{path}'. Save one first with cache.save(path).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several types for a truncated or garbled file
        raise CacheFileError(f"'{path}' is damaged or not a safetensors file ({exc}); recompute the cache and save it again.") from exc
    if _META_KEY not in meta:
        raise CacheFileError(f"'{path}' is a safetensors file but not a kvpack cache (no '{_META_KEY}' header).")
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CacheFileError(f"'{path}': the cache header is damaged ({exc}); recompute the cache and save it again.") from exc
    return header, tensors


def _check(header: dict, tensors: dict, path: Path, model, recipe) -> None:
    if header.get("format") != FORMAT:
        raise CacheFileError(f"'{path}' is not a kvpack cache file (format {header.get('format')!r}).")
    if header.get("version") not in READABLE:
        raise CacheFileError(
            f"'{path}' has cache format version {header.get('version')}, this kvpack reads version {VERSION}; "
            "recompute the cache with this kvpack version."
        )
    saved, here = header["model"], model_fingerprint(model)
    diff = [k for k in here if saved.get(k) != here[k]]
    if diff:
        what = ", ".join(f"{k}: saved {saved.get(k)!r} vs model {here[k]!r}" for k in diff if k != "weights_sha256")
        if "weights_sha256" in diff:
            what = (what + "; " if what else "") + "the model weights differ"
        raise CacheFileError(f"'{path}' was saved for a different model ({what}). Load it with the model it was made with.")
    want = recipe_fingerprint(recipe)
    if header["recipe"]["fingerprint"] != want:
        raise CacheFileError(
            f"'{path}' was saved with recipe '{header['recipe']['method']}' and cannot be read with recipe "
            f"'{recipe.method}' (different settings or codec state). Pass the recipe it was saved with."
        )
    if _checksum(tensors) != header.get("checksum"):
        raise CacheFileError(f"'{path}' is damaged: its tensor checksum does not match; recompute the cache and save it again.")


def _load_stream(prefix: str, state: dict, stream: TokenStream, tensors: dict, device) -> None:
    stream.head = tensors[f"{prefix}.head"].to(device) if state["head"] else None
    stream.tail = tensors[f"{prefix}.tail"].to(device) if state["tail"] else None
    stream.dropped, stream.head_dropped = state["dropped"], state["head_dropped"]
    for j, r in enumerate(state["runs"]):
        buffers = {n: tensors[f"{prefix}.run{j}.{n}"].to(device) for n in r["names"]}
        parts = tuple((n, tuple(buffers[n].shape[1:]), buffers[n].dtype) for n in sorted(buffers))
        sig = (parts, tuple(r["block_shape"]), repr(sorted(r["meta"].items())))
        if "lengths" in r:  # format 1
            lengths = {n: list(v) for n, v in r["lengths"].items()}
        else:
            table = tensors[f"{prefix}.run{j}.lengths"]
            lengths = {n: table[i].tolist() for i, n in enumerate(r["names"])}
        stream.body.runs.append(Run(tuple(r["block_shape"]), r["meta"], sig, buffers, lengths))


def load_cache(path: str | Path, model, recipe, cache_type: type):
    """Rebuild a cache of `cache_type` (CompressedCache) saved with `save_cache` for `model` and `recipe`."""
    path = Path(path)
    header, tensors = _read(path)
    _check(header, tensors, path, model, recipe)
    settings = header["cache"]
    cache = cache_type(model, recipe, residual_length=settings["recent_tokens"], block_tokens=settings["block_tokens"])
    if cache.block_tokens != settings["block_tokens"] or cache.sink_tokens != settings["sink_tokens"]:
        raise CacheFileError(f"'{path}': cache settings {settings} do not match this recipe's; pass the recipe it was saved with.")
    cache.left_pad = settings["left_pad"]
    device = next(model.parameters()).device
    try:
        for i, state in enumerate(header["layers"]):
            if state is None:
                continue
            layer = cache.layers[i]
            probe = torch.empty(0, dtype=getattr(torch, state["dtype"]), device=device)
            layer.lazy_initialization(probe, probe, cache.head_tokens)
            _load_stream(f"{i}.k", state["k"], layer.k, tensors, device)
            _load_stream(f"{i}.v", state["v"], layer.v, tensors, device)
        if "positions" in tensors:
            pos = tensors["positions"].to(device)
            cache.log_positions(0, pos)
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFileError(f"'{path}': the cache layout is inconsistent ({exc}); recompute the cache and save it again.") from exc
    return cache
