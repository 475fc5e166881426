"""kvpack's vLLM attention backend: pages of packed per-token slots, written as vLLM hands over new tokens and read
back through the block table.

- Spec (`customize_spec`): one head slot of `EngineLayout.page_content_bytes()` bytes per token, so vLLM's planner
  and its reported capacity count packed bytes.
- Write path (`forward`, which includes the cache update so it sees positions): keys are rotated back to pre-RoPE
  when the recipe is pre-RoPE, each token is encoded into its slot (`slots.SlotPart.encode`), and the first
  `sink_tokens` positions of a sequence also go, exactly, into the sink record of their page.
- Read path (`read.attend`): every request's tokens are gathered from its pages, decoded, re-rotated and
  attended with torch SDPA; all tokens, the new ones included, are read back from the pages.
- CUDA (query on a CUDA device): `cuda_read.forward` writes with the same torch code on the device and attends
  with the Triton page kernels (`triton_pages`); its metadata holds device tensors only (`cuda_read.metadata_fields`).
  Imported only there, so the CPU path loads no Triton kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvpack.integrations.vllm.config import KvpackVllmError
from kvpack.integrations.vllm.layout import EngineLayout, active_layout
from kvpack.integrations.vllm.pages import pool_for
from kvpack.integrations.vllm.read import attend
from kvpack.integrations.vllm.write import write_tokens


class KvpackBackend(AttentionBackend):
    """Attention over kvpack pages (CPU: torch; CUDA: Triton kernels; selected per engine by the kvpack plug-in)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        from vllm.platforms import current_platform

        return [MultipleOf(16)] if current_platform.is_cuda() else [MultipleOf(1)]  # CUDA: tiles of 16 tokens

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One head slot per token holding the packed slot bytes (mean over layers; see pages.PagePool)."""
        layout = active_layout()
        return replace(spec, num_head_slots=1, state_content_bytes=layout.page_content_bytes(spec.block_size))

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type["KvpackImpl"]:
        return KvpackImpl

    @staticmethod
    def get_builder_cls() -> type["KvpackMetadataBuilder"]:
        return KvpackMetadataBuilder


@dataclass
class KvpackMetadata:
    """Per step: token counts, per-request query ranges and lengths (CPU int64; on CUDA device int32), block table,
    slots, positions (CPU; on CUDA on the device), and on CUDA the host bounds of the step."""

    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [requests + 1]
    seq_lens: torch.Tensor  # [requests]
    block_table: torch.Tensor  # [requests, max blocks]
    slot_mapping: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens] position of each new token in its sequence
    max_query_len: int = 0  # CUDA: longest query, longest context (host ints for launch shapes)
    max_seq_len: int = 0


class KvpackMetadataBuilder(AttentionMetadataBuilder[KvpackMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KvpackMetadata:
        cm = common_attn_metadata
        if self.device.type == "cuda":
            import kvpack.integrations.vllm.cuda_read as cuda_read  # CUDA only: its Triton kernels

            return KvpackMetadata(**cuda_read.metadata_fields(cm))
        qsl = cm.query_start_loc_cpu.to(torch.int64)
        seq_lens = cm.seq_lens.to("cpu", torch.int64)
        q_lens = qsl[1:] - qsl[:-1]
        starts = torch.repeat_interleave(seq_lens - q_lens, q_lens)
        within = torch.arange(int(qsl[-1])) - torch.repeat_interleave(qsl[:-1], q_lens)
        positions = torch.zeros(max(cm.num_actual_tokens, int(qsl[-1])), dtype=torch.int64)  # padding tokens: 0
        positions[: int(qsl[-1])] = starts + within
        return KvpackMetadata(
            num_actual_tokens=cm.num_actual_tokens, query_start_loc=qsl, seq_lens=seq_lens,
            block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping, positions=positions,
        )


class KvpackImpl(AttentionImpl):
    """One attention layer over kvpack pages."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None, **kwargs) -> None:
        unsupported = {"ALiBi": alibi_slopes is not None, "sliding window": sliding_window is not None,
                       "logit soft-capping": bool(logits_soft_cap), "KV sharing": kv_sharing_target_layer_name is not None,
                       "attention sinks (learned)": sinks is not None, f"attention type {attn_type}": attn_type != AttentionType.DECODER}
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise KvpackVllmError(f"kvpack pages do not support {', '.join(bad)} in this model's attention; remove the "
                                  'kvpack entry from additional_config to serve it with vLLM\'s own cache.')
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.layout: EngineLayout = active_layout()
        self.layer_index: int | None = None

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: KvpackMetadata | None, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] (post-RoPE) -> output [T, Hq, D] (written in place)."""
        if output_scale is not None or output_block_scale is not None:
            raise KvpackVllmError("kvpack's backend does not fuse output quantization.")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if self.layer_index is None:
            self.layer_index = extract_layer_index(layer.layer_name)
        pool = pool_for(kv_cache, self.layout.layers)
        n = attn_metadata.num_actual_tokens
        if query.is_cuda:
            import kvpack.integrations.vllm.cuda_read as cuda_read  # CUDA only: its Triton kernels

            cuda_read.forward(self.layout, pool, self.layer_index, query[:n], key[:n], value[:n], attn_metadata,
                              self.scale, output[:n])
            return output
        write_tokens(self.layout, pool, self.layer_index, key[:n], value[:n], attn_metadata.slot_mapping[:n],
                     attn_metadata.positions[:n])
        attend(self.layout, pool, self.layer_index, query[:n], attn_metadata, self.scale, output[:n])
        return output
