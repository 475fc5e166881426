"""Process memory for the bench: resident bytes and the peak a decode step adds (RSS high-water on CPU,
the allocator's peak on CUDA)."""
from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; return the current bytes it is measured from."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux)
            f.write("5")
    except OSError:
        pass
    return rss()


def peak(device: torch.device) -> int:
    """Peak bytes since `reset_peak`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss()


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def dynamic_cache_bytes(cache) -> int:
    """Bytes a DynamicCache holds (its key/value tensors' storages)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total
