"""The plug-in: wrap the platform's config check and attention selection (see the package docstring). On CPU the
selection returns kvpack's backend directly; on CUDA it goes through vLLM's CUSTOM backend slot (`select_cuda`)."""
from __future__ import annotations

from kvpack.integrations.vllm.config import kvpack_entry
from kvpack.integrations.vllm.layout import active_layout, build_layout
from kvpack.integrations.vllm.selection import check_selection

BACKEND_PATH = "kvpack.integrations.vllm.backend.KvpackBackend"


def _entry(vllm_config):
    return None if vllm_config is None else kvpack_entry(getattr(vllm_config, "additional_config", None))


def select_cuda(select, attn_selector_config, num_heads=None, **kwargs) -> str:
    """On CUDA: kvpack's backend registered as vLLM's CUSTOM attention backend (for this engine's selection only:
    other engines of the process select their own), then selected through the platform's own code, which checks
    it against the device (head size, dtype, block size, compute capability) like any CUDA backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    return select(AttentionBackendEnum.CUSTOM, attn_selector_config=attn_selector_config, num_heads=num_heads,
                  **kwargs)


def register() -> None:
    """The plug-in (idempotent: vLLM may load plug-ins several times per process)."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if getattr(platform, "_kvpack_wrapped", False):
        return
    select, check = platform.get_attn_backend_cls, platform.check_and_update_config

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None, **kwargs):
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        if _entry(vllm_config) is None:
            return select(selected_backend, attn_selector_config=attn_selector_config, num_heads=num_heads, **kwargs)
        check_selection(attn_selector_config)
        layout = active_layout(vllm_config)
        if not getattr(cls, "_kvpack_logged", False):
            from vllm.logger import init_logger

            init_logger("vllm.kvpack").info("kvpack pages: %s", layout.describe())
            cls._kvpack_logged = True
        if current_platform.is_cuda():
            return select_cuda(select, attn_selector_config, num_heads, **kwargs)
        return BACKEND_PATH

    def check_and_update_config(cls, vllm_config) -> None:
        check(vllm_config)
        if _entry(vllm_config) is not None:
            build_layout(vllm_config)  # every start-up error here, in the process that called LLM(...)

    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform.check_and_update_config = classmethod(check_and_update_config)
    platform._kvpack_wrapped = True
