"""Checks on one attention layer's selection request: what kvpack pages cannot hold is an error, never a fallback."""
from __future__ import annotations

from kvpack.integrations.vllm.config import KvpackVllmError


def check_selection(selector) -> None:
    """Raise KvpackVllmError for MLA, sparse, sliding-window, sink or non-decoder attention layers."""
    kind = getattr(selector, "attn_type", "decoder")
    kind = str(getattr(kind, "value", kind))
    unsupported = {
        "multi-head latent attention (MLA)": getattr(selector, "use_mla", False),
        "sparse attention": getattr(selector, "use_sparse", False),
        "sliding-window attention": getattr(selector, "has_sliding_window", False),
        "learned attention sinks": getattr(selector, "has_sink", False),
        "non-causal attention": getattr(selector, "use_non_causal", False),
        f"attention type '{kind}'": kind != "decoder",
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise KvpackVllmError(f"This model has {', '.join(bad)}; kvpack pages hold full causal decoder attention only. "
                              'Remove the kvpack entry from additional_config to serve it with vLLM\'s own cache.')
