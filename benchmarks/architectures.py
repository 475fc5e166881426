"""What every transformers architecture with rotary embeddings gets from kvpack, on tiny random configs.

    python benchmarks/architectures.py --json results/architectures.json

Per architecture (a tiny randomly initialized model: 2 layers, hidden 64, 4 heads, 2 KV heads, no download):
  pre-RoPE   `fp16:pre-rope:sink1` (lossless storage, keys rotated back and forward by kvpack) through the real
             CompressedCache, prefill + decode steps, next to transformers' DynamicCache: "exact" if the logits
             agree to 1e-3, else the error kvpack raised ("refused: ...") or the difference ("WRONG");
  post-RoPE  the same with `fp16` (keys stored as the model hands them);
  int4       `int4:key-channel:g8` (post-RoPE) decodes to finite logits: "works", or the error;
  kvpack     the flagship preset `kvpack-3bit` (per-channel mixed widths, pre-RoPE keys), calibrated with
             kvpack.calibrate on 3 x 64 tokens of a random-word text (the tiny model's word tokenizer), with the
             option `:budget48` (`kvpack-3bit:budget48`: per-channel codebooks paid from 48 tokens of codes, since
             the calibration and the test sequence are short), then through the real cache as above: "works (max
             logit difference X)", or the error raised at calibration or in the cache.
Rows are written to JSON; `kvpack report` renders the README table from it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, DynamicCache

import kvpack
from kvpack.cache import CompressedCache
from kvpack.errors import KVPackError
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes import Recipe

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model_type -> extra config fields a tiny model of that type needs
EXTRA = {
    "gemma2": dict(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "gpt_oss": dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "phi3": dict(original_max_position_embeddings=256),
    "cohere2": dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "exaone4": dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
}
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "olmo", "cohere",
                 "cohere2", "glm", "glm4", "gpt_oss", "granite", "helium", "smollm3", "arcee", "starcoder2", "stablelm",
                 "mixtral", "qwen2_moe", "exaone4", "seed_oss", "ministral", "ernie4_5", "gpt_neox", "phi"]
VARIANTS = {"llama+dynamic-ntk": ("llama", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
            "llama+yarn": ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                          "original_max_position_embeddings": 128}))}


def tiny_model(model_type: str, extra: dict):
    kwargs = {**SIZES, **EXTRA.get(model_type, {}), **extra}
    config = CONFIG_MAPPING[model_type](**kwargs)
    torch.manual_seed(0)
    for attn in ("sdpa", "eager"):
        try:
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
        except (ValueError, ImportError):
            continue
    raise ValueError(f"no sdpa or eager attention for {model_type}")


@torch.no_grad()
def logits_through(model, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ids [1, T]: the first `prefill` tokens in one forward, the rest one token at a time."""
    out = [model(ids[:, :prefill], **cache_kwargs(cache)).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], **cache_kwargs(cache)).logits)
    return torch.cat(out, dim=1).float()


KVPACK = "kvpack-3bit:budget48"  # the flagship preset; budget48: codebooks paid from 48 tokens (short calibration)


def word_tokenizer():
    """A whitespace word-level tokenizer for the tiny models' 128-token vocabulary: word `wK` -> id K (K < 125)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(125)}
    vocab.update({"[UNK]": 125, "[BOS]": 126, "[EOS]": 127})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def calibration_text(path: Path) -> Path:
    """800 random words w0..w99 (seeded), the calibration text of tests/test_families.py."""
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (800,), generator=g)))
    return path


def kvpack_verdict(model, text: Path, ids: torch.Tensor, reference: torch.Tensor) -> str:
    try:
        recipe = kvpack.calibrate(model, word_tokenizer(), KVPACK, data=str(text), windows=3, seqlen=64,
                                  progress=False)
    except KVPackError as exc:
        return f"refused at calibration: {str(exc).split('; ')[0].split('. ')[0]}"
    except Exception as exc:
        return f"ERROR at calibration: {type(exc).__name__}: {str(exc)[:160]}"
    return verdict(model, recipe, ids, reference, exact=False)


def verdict(model, method: str | Recipe, ids: torch.Tensor, reference: torch.Tensor, exact: bool) -> str:
    try:
        recipe = method if isinstance(method, Recipe) else Recipe.baseline(
            method, model.config.get_text_config().num_hidden_layers)
        cache = CompressedCache(model, recipe)
        got = logits_through(model, cache, ids, 24)
    except KVPackError as exc:
        return f"refused: {str(exc).split('; ')[0].split('. ')[0]}"
    except Exception as exc:  # not a kvpack refusal: an error this table must show, not hide
        return f"ERROR: {type(exc).__name__}: {str(exc)[:160]}"
    if not torch.isfinite(got).all():
        return "WRONG: non-finite logits"
    diff = float((got - reference).abs().max())
    if exact:
        return "exact" if diff < 1e-3 else f"WRONG: logits differ by {diff:.3g}"
    return f"works (max logit difference {diff:.3g})"


def check(name: str, model_type: str, extra: dict, text: Path) -> dict:
    row = {"architecture": name, "model_type": model_type}
    try:
        model = tiny_model(model_type, extra)
    except Exception as exc:  # a config this script cannot make tiny: say so, do not guess
        return {**row, "pre_rope": f"not tested: tiny config failed ({type(exc).__name__}: {str(exc)[:120]})",
                "post_rope": "not tested", "int4": "not tested", "kvpack": "not tested"}
    ids = torch.randint(3, 120, (1, 30), generator=torch.Generator().manual_seed(0))
    try:
        reference = logits_through(model, DynamicCache(config=model.config), ids, 24)
    except Exception as exc:
        return {**row, "pre_rope": f"not tested: the tiny model does not run ({type(exc).__name__}: {str(exc)[:120]})",
                "post_rope": "not tested", "int4": "not tested", "kvpack": "not tested"}
    row["pre_rope"] = verdict(model, "fp16:pre-rope:sink1", ids, reference, exact=True)
    row["post_rope"] = verdict(model, "fp16", ids, reference, exact=True)
    row["int4"] = verdict(model, "int4:key-channel:g8", ids, reference, exact=False)
    row["kvpack"] = kvpack_verdict(model, text, ids, reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("results/architectures.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvpack-architectures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    text = calibration_text(args.work / "calib.txt")
    cases = [(m, m, {}) for m in ARCHITECTURES if m in CONFIG_MAPPING] + [(n, t, e) for n, (t, e) in VARIANTS.items()]
    rows = []
    for name, model_type, extra in cases:
        start = time.perf_counter()
        row = check(name, model_type, extra, text)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(f"{name:22s} pre-RoPE {row['pre_rope'][:50]:50s} | post-RoPE {row['post_rope'][:30]:30s} "
              f"| int4 {row['int4'][:36]:36s} | {KVPACK} {row['kvpack'][:60]} ({row['seconds']} s)", flush=True)
    env = {"transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": "python benchmarks/architectures.py --json " + str(args.json),
                                     "env": env, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
