"""Long prefill chunks through vLLM's own CPU attention kernel, over kvpack's decoded pages.

Requests with many new tokens (prefill chunks) get their cached tokens decoded once (`kernel.dense`); this module
stages them, in the model's dtype, in a scratch cache laid out as vLLM's CPU backend lays out its own (blocks of
128 tokens, its default, `cpu_attn_reshape_and_cache`) and runs `cpu_attention_with_kv_cache` over it: the kernel vLLM
runs for a prefill with its own cache (AMX tiles for a bf16 model where the CPU has them), causal and bottom-right
aligned.
With one layer of scratch at a time, the extra memory is one chunk's decoded keys and values.

Used for bf16 models, where vLLM's kernel measured faster than torch's SDPA (1024-token prompt, 9 query heads over
3 KV heads of 64, 2 threads: 1.6 ms against 2.5 ms, benchmarks/vllm_profile.py shows the share in serving); other
dtypes, and any vLLM build whose ops refuse the call, keep torch's SDPA (`kernel._attend_dense`).
"""
from __future__ import annotations

import warnings

import torch

try:  # vLLM's CPU ops (absent where the vLLM backend's torch-free parts are used without vLLM, e.g. its Triton tests)
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
except ImportError:
    ops = _get_attn_isa = None

# tokens per scratch block: vLLM's CPU default (its AMX and vector kernels take multiples of 32; over 4 x 1024 tokens
# of the default model, 2 threads, AMX, its kernel took 7.5 ms with blocks of 128 against 8.0 ms with blocks of 32)
BLOCK = 128
_broken: list[str] = []  # the first refusal's message: the path is not tried again in this process


def usable(dtype: torch.dtype, head_dim: int) -> bool:
    """vLLM's kernel is used for this model: bf16 and a head size vLLM's CPU kernels take, and no earlier refusal."""
    return ops is not None and dtype == torch.bfloat16 and head_dim % 32 == 0 and not _broken


def scratch_cache(keys: torch.Tensor, values: torch.Tensor, lens: list[int], dtype: torch.dtype,
                  block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """keys/values [sum(lens), Hkv, D] (request after request) in vLLM's CPU cache layout, in `dtype`: (key cache,
    value cache [blocks, Hkv, block, D] each, views of one buffer as vLLM's backend allocates it; block table int32
    [requests, most blocks], each request's blocks in order; the ISA vLLM's kernels use for it). A block's unused
    tail is zero (vLLM's kernels read it, masked)."""
    kv_heads, dim = keys.shape[1:]
    isa = _get_attn_isa(dtype, block, dim, "auto")
    if isa == "amx":
        torch.cpu._init_amx()  # the process's permission for AMX tiles (vLLM's engine has it already)
    blocks = [-(-n // block) for n in lens]
    key_cache, value_cache = torch.zeros(sum(blocks), kv_heads, 2 * block, dim, dtype=dtype).chunk(2, dim=2)
    first = torch.tensor([0] + blocks[:-1]).cumsum(0)
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    for r, (start, count) in enumerate(zip(first.tolist(), blocks)):
        table[r, :count] = torch.arange(start, start + count, dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int64)
    pos = torch.arange(int(seq.sum())) - torch.repeat_interleave(torch.cumsum(seq, 0) - seq, seq)
    slots = torch.repeat_interleave(first * block, seq) + pos
    ops.cpu_attn_reshape_and_cache(keys.to(dtype), values.to(dtype), key_cache, value_cache, slots, isa)
    return key_cache, value_cache, table, isa


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_lens: list[int], lens: list[int],
           scale: float) -> torch.Tensor | None:
    """Causal attention of query [sum(q_lens), Hq, D] (request after request; request r's queries are the last q_lens[r]
    of its lens[r] tokens) over keys/values [sum(lens), Hkv, D] (float32, request after request) -> [sum(q_lens), Hq, D]
    in the query's dtype; None when vLLM's ops refuse (a warning names why, and SDPA is used from then on)."""
    dtype, (tokens, heads, dim), kv_heads = query.dtype, query.shape, keys.shape[1]
    try:
        key_cache, value_cache, table, isa = scratch_cache(keys, values, lens, dtype)
        qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        plan = ops.cpu_attn_get_scheduler_metadata(len(lens), heads, kv_heads, dim, seq_lens, dtype, qsl, True, -1, isa,
                                                   False)
        out = torch.empty(tokens, heads, dim, dtype=dtype)
        ops.cpu_attention_with_kv_cache(query.contiguous(), key_cache, value_cache, out, qsl, seq_lens, scale, True,
                                        None, -1, table, 0.0, plan, None)
        return out
    except (RuntimeError, AttributeError, TypeError, NotImplementedError) as exc:
        _broken.append(str(exc))
        warnings.warn(f"kvpack: vLLM's CPU attention kernel refused a prefill over decoded pages ({exc}); "
                      "prefill chunks use torch's SDPA from now on.", RuntimeWarning, stacklevel=2)
        return None
