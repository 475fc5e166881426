"""LMCache's TurboQuant serde on the CPU: its Triton kernels in Triton's interpreter, and a torch port.

LMCache 0.5.6's `turboquant` serde runs Triton kernels on a CUDA device and refuses CPU-only
machines ("TurboQuant Triton serde requires CUDA"). For a side-by-side on the CPU:
- `interpreter_roundtrip` runs LMCache's own TurboQuantSerializer / TurboQuantDeserializer with
  TRITON_INTERPRET=1 (Triton executes the kernels in numpy on the CPU) after pointing its device
  selection at the CPU; exact bytes, but far too slow for more than a few layers.
- `port_roundtrip` is the same arithmetic in torch (rotation, Lloyd-Max bucketize, norm correction,
  per-vector uniform values, fp16 norms/scales, the same per-layer seeds and skipped layers); its
  output is checked against the interpreter on real chunks (`python benchmarks/lmcache_turboquant_cpu.py`)
  and it is what the benchmark uses for quality. Stored bytes always come from LMCache's own
  `estimate_serialized_size` (its layout is fixed-size).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

PRESETS = ["turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]


def tq_config(preset: str, head_dim: int):
    from lmcache.v1.distributed.serde.turboquant.turboquant import TurboQuantSerdeConfig

    return TurboQuantSerdeConfig(preset=preset, head_dim=head_dim)


def serialized_nbytes(chunk_shape, dtype, preset: str, head_dim: int) -> int:
    """Bytes LMCache's turboquant serde stores for one chunk (its own estimate_serialized_size)."""
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    from lmcache.v1.distributed.serde.turboquant.turboquant import TurboQuantSerializer

    return TurboQuantSerializer(tq_config(preset, head_dim)).estimate_serialized_size(
        MemoryLayoutDesc([torch.Size(chunk_shape)], [dtype]))


def _uniform_values(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-vector min-max uniform quantization of v [N, D] as the store kernel does; fp16 scale and zero."""
    levels = (1 << bits) - 1
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    q = ((v - lo) / scale + 0.5).to(torch.int32).clamp(0, levels).float()
    return (q * scale.half().float() + lo.half().float()).half()


@torch.no_grad()
def port_roundtrip(chunk: torch.Tensor, preset: str, head_dim: int) -> torch.Tensor:
    """chunk [2, L, T, H * head_dim] -> what LMCache's turboquant serde gives back (same dtype)."""
    from lmcache.v1.distributed.serde.turboquant import turboquant as tq

    cfg = tq_config(preset, head_dim)
    _, layers, tokens, width = chunk.shape
    heads = width // head_dim
    start, end = tq._layer_ranges(layers, cfg)
    out = chunk.clone()
    for layer in range(start, end):
        pi_t, midpoints, centroids = tq._make_tq_tensors_for_layer(cfg, layer, torch.device("cpu"))
        k = chunk[0, layer].float().reshape(tokens * heads, head_dim)
        v = chunk[1, layer].float().reshape(tokens * heads, head_dim)
        if cfg.key_fp8:
            k_rec = k.to(torch.float8_e4m3fn).float().half()
        else:
            norms = k.norm(dim=1, keepdim=True)
            y = (k / (norms + 1e-8)) @ pi_t
            idx = torch.bucketize(y, midpoints, right=True).clamp_max(cfg.n_centroids - 1)
            c = centroids[idx]
            if cfg.norm_correction:
                c = c / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16)
            k_rot = (norms.half().float() * c).half()
            k_rec = (k_rot.float() @ pi_t.T.contiguous()).half()
        v_rec = _uniform_values(v, cfg.value_quant_bits)
        out[0, layer] = k_rec.reshape(tokens, width).to(chunk.dtype)
        out[1, layer] = v_rec.reshape(tokens, width).to(chunk.dtype)
    return out


def interpreter_roundtrip(chunk: torch.Tensor, preset: str, head_dim: int) -> tuple[torch.Tensor, int, float, float]:
    """LMCache's own turboquant serde on the CPU through Triton's interpreter (call in a process started with
    TRITON_INTERPRET=1). Returns (reloaded chunk, bytes written, serialize s, deserialize s)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.serde.turboquant import decode_kernel, store_kernel
    from lmcache.v1.distributed.serde.turboquant import turboquant as tq
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    tq._select_cuda_device = lambda *args, **kwargs: torch.device("cpu")
    decode_kernel._use_fp8_e4b15 = store_kernel._use_fp8_e4b15 = lambda device=0: 0

    def obj(t: torch.Tensor, fmt) -> TensorMemoryObj:
        raw = t.contiguous().reshape(-1).view(torch.uint8).clone()
        meta = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0, phy_size=raw.numel(), ref_count=1, fmt=fmt,
                                 shapes=[t.shape], dtypes=[t.dtype])
        return TensorMemoryObj(raw, meta, None)

    cfg = tq_config(preset, head_dim)
    ser, de = tq.TurboQuantSerializer(cfg), tq.TurboQuantDeserializer(cfg)
    size = ser.estimate_serialized_size(MemoryLayoutDesc([chunk.shape], [chunk.dtype]))
    buf = obj(torch.zeros(size, dtype=torch.uint8), MemoryFormat.BINARY)
    key = ObjectKey(b"\0" * 16, "tq-cpu", 0)
    t0 = time.perf_counter()
    written = ser.serialize(obj(chunk, MemoryFormat.KV_2LTD), buf, key)
    t1 = time.perf_counter()
    back = obj(torch.zeros_like(chunk), MemoryFormat.KV_2LTD)
    de.deserialize(buf, back, key)
    t2 = time.perf_counter()
    return back.tensor.clone(), written, t1 - t0, t2 - t1


def check_port(chunk_file: Path, layers: int, head_dim: int, out_json: Path) -> None:
    """Run in a fresh process (TRITON_INTERPRET=1): compare the port with LMCache's kernels on the first `layers` layers."""
    chunk = torch.load(chunk_file)[:, :layers].contiguous()
    rows = []
    for preset in PRESETS:
        real, written, ser_s, de_s = interpreter_roundtrip(chunk, preset, head_dim)
        port = port_roundtrip(chunk, preset, head_dim)
        diff = (real.float() - port.float()).abs()
        quant = real.float()[:, 2:layers - 2]
        rows.append({
            "preset": preset, "layers_checked": layers, "bytes": written, "serialize_s": ser_s, "deserialize_s": de_s,
            "mb": chunk.numel() * chunk.element_size() / 1e6,
            "port_equal_fraction": float((diff == 0).float().mean()), "port_max_abs_diff": float(diff.max()),
            "port_rel_diff": float((real.float() - port.float()).norm() / max(float(quant.norm()), 1e-12)),
        })
        print(json.dumps(rows[-1]), flush=True)
    out_json.write_text(json.dumps(rows, indent=1))


def run_check(chunk: torch.Tensor, layers: int, head_dim: int, workdir: Path) -> list[dict]:
    """`check_port` in a child process with TRITON_INTERPRET=1; returns its rows."""
    chunk_file, out_json = workdir / "tq_check_chunk.pt", workdir / "tq_check.json"
    torch.save(chunk.contiguous(), chunk_file)
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, __file__, str(chunk_file), str(layers), str(head_dim), str(out_json)], check=True, env=env)
    return json.loads(out_json.read_text())


if __name__ == "__main__":
    torch.set_num_threads(1)
    check_port(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
