"""Long prefill chunks through vLLM's own CPU attention kernel, over kvpack's decoded pages.

Requests with many new tokens (prefill chunks) get their cached tokens decoded once, in the model's dtype
(`kernel.dense`); `stage` writes them with vLLM's own `cpu_attn_reshape_and_cache` into a scratch cache laid out as
vLLM's CPU backend lays out its own (blocks of 128 tokens, its default; only each request's last block zeroed) and
`run` runs `cpu_attention_with_kv_cache` over it: the kernel vLLM runs for a prefill with its own cache (AMX tiles
for a bf16 model where the CPU has them), causal and bottom-right aligned.
With one layer of scratch at a time, the extra memory is one chunk's decoded keys and values.

Used for bf16 models, where vLLM's kernel measured faster than torch's SDPA (1024-token prompt, 9 query heads over
3 KV heads of 64, 2 threads: 1.6 ms against 2.5 ms, benchmarks/vllm_profile.py shows the share in serving); other
dtypes, and any vLLM build whose ops refuse the call, keep torch's SDPA (`kernel._attend_dense`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

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


@dataclass
class Scratch:
    """A scratch cache laid out as vLLM's CPU backend lays out its own: key/value caches [blocks, Hkv, block, D] in
    the model's dtype (views of one buffer, K and V of a block side by side, as vLLM allocates them), the block table
    int32 [requests, most blocks] (each request's blocks in order), each request's first block (int64 [requests]),
    the token counts and the ISA vLLM's kernels use for it."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    table: torch.Tensor
    first: torch.Tensor
    lens: list[int]
    isa: str


def scratch(lens: list[int], kv_heads: int, dim: int, dtype: torch.dtype, block: int = BLOCK) -> Scratch:
    """An empty Scratch for requests of `lens` tokens: allocated, not filled, but for each request's last block,
    zeroed (vLLM's kernels read the rows past a request's tokens, masked)."""
    isa = _get_attn_isa(dtype, block, dim, "auto")
    if isa == "amx":
        torch.cpu._init_amx()  # the process's permission for AMX tiles (vLLM's engine has it already)
    blocks = [-(-n // block) for n in lens]
    buffer = torch.empty(sum(blocks), kv_heads, 2 * block, dim, dtype=dtype)
    first = torch.tensor([0] + blocks[:-1], dtype=torch.int64).cumsum(0)
    buffer[first + torch.tensor(blocks) - 1] = 0
    key_cache, value_cache = buffer.chunk(2, dim=2)
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    for r, (start, count) in enumerate(zip(first.tolist(), blocks)):
        table[r, :count] = torch.arange(start, start + count, dtype=torch.int32)
    return Scratch(key_cache, value_cache, table, first, list(lens), isa)


def stage(keys: torch.Tensor, values: torch.Tensor, lens: list[int], block: int = BLOCK) -> Scratch | None:
    """keys/values [sum(lens), Hkv, D] (request after request, in the model's dtype) written into a Scratch by vLLM's
    own `cpu_attn_reshape_and_cache` (which lays a block out as its kernels read it, e.g. in AMX tile order); None
    when vLLM's ops refuse (a warning names why, and SDPA is used from then on)."""
    try:
        sc = scratch(lens, keys.shape[1], keys.shape[2], keys.dtype, block)
        seq = torch.tensor(lens, dtype=torch.int64)
        pos = torch.arange(int(seq.sum())) - torch.repeat_interleave(torch.cumsum(seq, 0) - seq, seq)
        slots = torch.repeat_interleave(sc.first * block, seq) + pos
        ops.cpu_attn_reshape_and_cache(keys, values, sc.key_cache, sc.value_cache, slots, sc.isa)
        return sc
    except (RuntimeError, AttributeError, TypeError, NotImplementedError) as exc:
        _refused(exc)
        return None


def _refused(exc: Exception) -> None:
    _broken.append(str(exc))
    warnings.warn(f"kvpack: vLLM's CPU attention kernel refused a prefill over decoded pages ({exc}); "
                  "prefill chunks use torch's SDPA from now on.", RuntimeWarning, stacklevel=3)


def run(query: torch.Tensor, sc: Scratch, q_lens: list[int], scale: float) -> torch.Tensor | None:
    """Causal attention of query [sum(q_lens), Hq, D] (request after request; request r's queries are the last
    q_lens[r] of its sc.lens[r] tokens) over the scratch cache -> [sum(q_lens), Hq, D] in the query's dtype; None when
    vLLM's ops refuse (a warning names why, and SDPA is used from then on)."""
    dtype, (tokens, heads, dim), kv_heads = query.dtype, query.shape, sc.key_cache.shape[1]
    try:
        qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor(sc.lens, dtype=torch.int32)
        plan = ops.cpu_attn_get_scheduler_metadata(len(sc.lens), heads, kv_heads, dim, seq_lens, dtype, qsl, True, -1,
                                                   sc.isa, False)
        out = torch.empty(tokens, heads, dim, dtype=dtype)
        ops.cpu_attention_with_kv_cache(query.contiguous(), sc.key_cache, sc.value_cache, out, qsl, seq_lens, scale,
                                        True, None, -1, sc.table, 0.0, plan, None)
        return out
    except (RuntimeError, AttributeError, TypeError, NotImplementedError) as exc:
        _refused(exc)
        return None
