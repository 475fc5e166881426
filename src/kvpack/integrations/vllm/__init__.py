"""kvpack inside vLLM: the `vllm.general_plugins` entry point and the engine-level wiring.

`register()` runs in every vLLM process (front end, engine core, workers). It changes nothing by itself: it wraps
the current platform's config check and attention selection so that an engine whose `additional_config` holds a
`kvpack` entry is checked at start-up (clear errors, raised where `LLM(...)` / `vllm serve` is called) and gets
kvpack's backend (`backend.KvpackBackend`); every other engine goes through vLLM's own code untouched. Selection
is per engine config rather than `register_backend(CPU_ATTN, ...)`, which would replace the CPU backend for every
engine of the process. vLLM itself is imported only where it is used (it is an optional dependency).
"""
from kvpack.integrations.vllm.plugin import BACKEND_PATH, register

__all__ = ["BACKEND_PATH", "register"]
