"""RoPE variants the cache cannot store pre-RoPE are refused up front; post-RoPE methods stay exact on them,
and attention arguments packed attention does not implement (GPT-OSS's s_aux sinks) take the exact path."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, DynamicCache, GptOssConfig, LlamaConfig

from kvpack.cache import CompressedCache
from kvpack.errors import UnsupportedArchitectureError
from kvpack.hf.attention import cache_kwargs
from kvpack.recipes import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, head_dim=16, pad_token_id=0)
IDS = torch.randint(3, 120, (1, 30), generator=torch.Generator().manual_seed(0))


def tiny(config_cls, **extra):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**SIZES, **extra), attn_implementation="eager").eval()


@torch.no_grad()
def logits(model, cache) -> torch.Tensor:
    out = [model(IDS[:, :24], **cache_kwargs(cache)).logits]
    out += [model(IDS[:, t:t + 1], **cache_kwargs(cache)).logits for t in range(24, 30)]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("model", [
    pytest.param(lambda: tiny(CohereConfig), id="cohere-interleaved"),
    pytest.param(lambda: tiny(GptOssConfig, num_local_experts=2, num_experts_per_tok=1, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"]), id="gpt-oss-half-table"),
    pytest.param(lambda: tiny(LlamaConfig, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                 id="dynamic-ntk"),
])
def test_pre_rope_refused_post_rope_exact(model):
    model = model()
    with pytest.raises(UnsupportedArchitectureError, match="post-RoPE method"):
        CompressedCache(model, Recipe.baseline("fp16:pre-rope", 2))
    reference = logits(model, DynamicCache(config=model.config))
    torch.testing.assert_close(logits(model, CompressedCache(model, Recipe.baseline("fp16", 2))), reference,
                               atol=1e-3, rtol=1e-3)
