"""Fast CPU path: the C++ kernels of cpu_kernels.cpp, compiled on first use and called through ctypes.

Why not torch.utils.cpp_extension: the kernels need no torch headers, so a plain `g++ -O3
-march=native -fopenmp -shared` build does (about 30-40 s on a 2-core machine, printed when it starts,
once per CPU: `make setup` runs it), and the library is cached under `cache_root()/kernels/` keyed by
the source, the compiler flags and the CPU (model and feature flags), so a library built on another
CPU is never reused. `available()` is False (and attention uses the torch path, with a warning from the
cache) without g++, without AVX2/FMA/F16C, or with KVPACK_CPU_KERNELS=0; `error()` says which.

A layer's whole decode-step attention is one C call, `kvpack_layer(int64 args[])`: the arguments
(pointers, sizes, strides) of its fp16 head/tail and of every run of packed blocks, in token order,
plus the query, mask and RoPE rows; the C side computes scores, softcap/mask/softmax and p . v, so
a layer costs one ctypes conversion instead of dozens of small torch ops.
"""
from __future__ import annotations

import array
import ctypes
import fcntl
import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kvpack.codecs import Encoded, sparse
from kvpack.codecs.nuq import NuqCodec, outliers_per_side
from kvpack.codecs.turboquant import TurboQuantCodec
from kvpack.hf.models import cache_root
from kvpack.kernels.layout import (MixedNuqView, NuqView, RvqView, TqView, mixed_view, nuq_view, run_key, rvq_view,
                                   sparse_mode, tq_view, view_tensors)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEADERS = Path(__file__).with_name("cpu_kernels")  # the per-family headers SOURCE includes
ISA_FLAGS = {"native": [], "avx512": [], "avx2": ["-mno-avx512f"]}  # KVPACK_CPU_ISA: the widest vectors built
FLAGS = ["-O3", "-march=native", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ABI_VERSION = int(re.search(r"#define KVPACK_ABI_VERSION (\d+)", (HEADERS / "abi.h").read_text()).group(1))

_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None

SEG_FP16, SEG_NUQ, SEG_RVQ, SEG_TQ, SEG_MIXED = 0, 1, 2, 3, 4


def _cpu_ok() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and platform.machine() in ("x86_64", "AMD64")


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((line for line in text.splitlines() if line.startswith("model name")), "")
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        return model + flags
    except OSError:
        return platform.processor()


def instruction_set() -> str:
    """The widest x86 vector instruction set this CPU offers to the kernels (from /proc/cpuinfo, else torch)."""
    flags = set(_cpu_id().split())
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        extra = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_fp16", "FP16"), ("amx_bf16", "AMX-BF16"))
                 if flag in flags]
        return "AVX512" + (f" (+{', '.join(extra)})" if extra else "")
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> str | None:
    """The C++ compiler the kernels are built with (g++, else c++), or None."""
    return shutil.which("g++") or shutil.which("c++")


def isa_flags() -> list[str]:
    """Compiler flags of KVPACK_CPU_ISA (native, the default; avx2: no AVX-512 code even where the CPU has it)."""
    name = os.environ.get("KVPACK_CPU_ISA", "native").lower()
    if name not in ISA_FLAGS:
        raise RuntimeError(f"KVPACK_CPU_ISA={name!r}: use one of {', '.join(ISA_FLAGS)}")
    return ISA_FLAGS[name]


def _sources() -> bytes:
    return SOURCE.read_bytes() + b"".join(h.name.encode() + h.read_bytes() for h in sorted(HEADERS.glob("*.h")))


def library_path() -> Path:
    flags = " ".join(FLAGS + isa_flags())
    key = hashlib.sha256(_sources() + flags.encode() + _cpu_id().encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"kvpack_cpu_{key}.so"


def _build(path: Path) -> None:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found: install one (apt-get install g++) for the fast CPU path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        started = time.perf_counter()
        print(f"kvpack: compiling the C++ CPU attention kernels for this CPU ({instruction_set()}) with {cxx}, "
              f"once (about half a minute on 2 cores) -> {path}", file=sys.stderr, flush=True)
        try:
            subprocess.run([cxx, *FLAGS, *isa_flags(), str(SOURCE), "-o", tmp], check=True, capture_output=True,
                           text=True)
            os.replace(tmp, path)
            print(f"kvpack: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{exc.stderr[-2000:]}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None when unavailable (see `error()`)."""
    global _LIB, _ERROR
    if _LIB is not None or _ERROR is not None:
        return _LIB
    if os.environ.get("KVPACK_CPU_KERNELS", "1") == "0":
        _ERROR = "disabled by KVPACK_CPU_KERNELS=0"
        return None
    if not _cpu_ok():
        _ERROR = f"needs an x86-64 CPU with AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
        return None
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        _LIB = open_library(path)
    except (OSError, RuntimeError) as exc:
        _ERROR = str(exc)
    return _LIB


def open_library(path: Path) -> ctypes.CDLL:
    """A compiled kernel library at `path` (this ABI version, else RuntimeError), its entry points typed."""
    lib = ctypes.CDLL(str(path))
    if lib.kvpack_abi_version() != ABI_VERSION:
        raise RuntimeError(f"stale kernel library {path}: ABI {lib.kvpack_abi_version()}, this code needs "
                           f"{ABI_VERSION}")
    for name in ("kvpack_layer", "kvpack_nuq_encode", "kvpack_mixed_encode", "kvpack_mixed_decode"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    return lib


@contextmanager
def using(lib: ctypes.CDLL):
    """Run the kernels of `lib` (see `open_library`) inside the block, e.g. to time two builds in one process."""
    global _LIB
    load()
    before, _LIB = _LIB, lib
    try:
        yield lib
    finally:
        _LIB = before


def kernel_isa() -> str | None:
    """The vector instruction set the loaded library was built for ("AVX512" or "AVX2"; KVPACK_CPU_ISA=avx2 builds
    AVX2 code on an AVX-512 CPU), or None without the library."""
    lib = load()
    return None if lib is None else {512: "AVX512", 256: "AVX2"}.get(lib.kvpack_isa(), "unknown")


def available() -> bool:
    return load() is not None


def error() -> str | None:
    load()
    return _ERROR


def _int64s(values: list[int]) -> array.array:
    """values as a C int64 array (array.array converts in C: a few us for a layer's ~150 arguments, where a ctypes
    array costs several times that)."""
    return array.array("q", values)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _float_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def _outlier_args(o) -> list[int]:
    if o is None or o.values.numel() == 0:
        return [0, 0, 0, 0, 0, 0]
    return [_ptr(o.values), _ptr(o.positions), o.positions.element_size(), _ptr(o.counts), o.counts.element_size(),
            o.mode]


def _fp16_segment(t: torch.Tensor) -> list[int] | None:
    st = t.stride()
    if t.dtype != torch.float16 or st[-1] != 1:
        return None
    n = t.shape[-2]
    return [n, SEG_FP16, t.data_ptr(), st[0], st[1], st[2], n]


def _run_head(view) -> list[int]:
    return [view.run_tokens, _ptr(view.codes), *view.codes.stride()[:4], view.nblk, view.tokens]


def nuq_segment(view: NuqView, keys: bool) -> list[int]:
    """Arguments of one run of nuq blocks (kind SEG_NUQ, see run_segment in cpu_kernels.cpp): the codec's fp16
    levels [1 | H, 2**bits], Q-Norm and keys' ranges as it holds them (the C side decodes them per call)."""
    n, *codes = _run_head(view)
    c = view.codec
    args = [n, SEG_NUQ, *codes, view.bits, _ptr(c.level_data), int(c.level_data.shape[0] > 1), _ptr(c.qnorm),
            *_outlier_args(view.outliers)]
    if keys:
        return args + [_ptr(c.scale), _ptr(c.zero)]
    s = view.vscale.stride()
    return args + [_ptr(view.vscale), _ptr(view.vzero), s[0], s[1], s[2] if view.vscale.shape[2] > 1 else 0, s[3],
                   int(view.span_all)]


def rvq_segment(view: RvqView) -> list[int]:
    """Arguments of one run of residual-VQ blocks (kind SEG_RVQ)."""
    n, *codes = _run_head(view)
    depth, size, group = view.books.shape
    o = view.outliers
    has = o is not None and o.values.numel() > 0
    return [n, SEG_RVQ, *codes, _ptr(view.scale), *view.scale.stride(), _ptr(view.books16), depth, size, group,
            view.code_bits, _ptr(view.inv_perm), _ptr(o.values) if has else 0, _ptr(o.positions) if has else 0,
            o.positions.element_size() if has else 0, _ptr(o.counts) if has else 0, o.counts.element_size() if has else 0]


def tq_segment(view: TqView) -> list[int]:
    """Arguments of one run of TurboQuant blocks (kind SEG_TQ): both code rows, widths, levels, norms, rotation."""
    def rows(codes: torch.Tensor | None) -> list[int]:
        return [0, 0, 0, 0, 0] if codes is None else [_ptr(codes), *codes.stride()[:4]]

    hi = view.codes_hi if view.codes_hi is not None else view.codes_lo
    return [view.run_tokens, SEG_TQ, *rows(hi), view.nblk, view.tokens, *rows(view.codes_lo), view.high, view.low,
            view.high_count, _ptr(view.levels_hi), _ptr(view.levels_lo), _ptr(view.norm), *view.norm.stride(),
            _ptr(view.rotation)]


MIXED_HEAD, MIXED_GROUP = 15, 6  # mixed_segment: arguments before the first group, per group


def _strides(t: torch.Tensor) -> list[int]:
    """t's strides, 0 for dims of size 1 (never stepped over), so arguments of a run seen as one growing block
    (`layout._as_one_block`) depend on its length only through its token counts and buffer addresses
    (`_grown_one_block`)."""
    return [st if n > 1 else 0 for st, n in zip(t.stride(), t.shape)]


def _grown_one_block(args: array.array, run) -> None:
    """Bring mixed_segment's arguments of a run read as one block (batch 1, one-token blocks) up to date after
    appends: its token counts and where its buffers are now (an append may have moved a buffer to grow it)."""
    args[0] = args[8] = run.tokens
    groups = args[9]
    for i in range(groups):
        at = MIXED_HEAD + MIXED_GROUP * i
        args[at + 2] = run.buffers[f"codes{args[at]}"].data_ptr()
    at = MIXED_HEAD + MIXED_GROUP * groups
    if args[at]:  # values: per-token scale and zero
        args[at], args[at + 1] = run.buffers["scale"].data_ptr(), run.buffers["zero"].data_ptr()
    at += 6
    if args[at]:  # outliers: values, positions, counts
        args[at] = run.buffers["outlier_values"].data_ptr()
        args[at + 1] = run.buffers["outlier_indices"].data_ptr()
        args[at + 3] = run.buffers["outlier_counts"].data_ptr()


def mixed_segment(view: MixedNuqView, keys: bool) -> list[int]:
    """Arguments of one run of mixed-width nuq blocks (kind SEG_MIXED): every width group, value ranges, outliers."""
    c = view.groups[0].codec  # fp16 levels [sum of 2**width] (channel after channel), widths [H * D], Q-Norm [H * D, 2],
    keyed = c.axis == "channel"  # keys' ranges [H * D]: the codec's, once per model, shared by every group
    args = [view.run_tokens, SEG_MIXED, 0, 0, 0, 0, 0, view.nblk, view.tokens, len(view.groups),
            _ptr(c.level_data), _ptr(c.channel_bits), _ptr(c.qnorm), _ptr(c.scale) if keyed else 0,
            _ptr(c.zero) if keyed else 0]
    for g in view.groups:
        sblk, sb, _ = _strides(g.codes)
        args += [g.bits, g.n, _ptr(g.codes), sblk, sb, g.n * g.bits // 8]
    if keys or view.vscale is None:
        args += [0, 0, 0, 0, 0, 0]
    else:
        s = view.vscale.stride()
        sblk, sb, sh, _ = _strides(view.vscale)
        args += [_ptr(view.vscale), _ptr(view.vzero), sblk, sb, sh, s[3]]
    return args + _outlier_args(view.outliers)


def _run_segment(run, codec, keys: bool, rotary_keys: bool):
    """(view, segment args) of one run of packed blocks, or None if no kernel reads it."""
    view = nuq_view(run, codec)
    if view is not None:
        return (view, None) if view.axis != ("channel" if keys else "token") else (view, lambda: nuq_segment(view, keys))
    view = mixed_view(run, codec)
    if view is not None:
        return (view, None) if view.axis != ("channel" if keys else "token") else (view, lambda: mixed_segment(view, keys))
    view = rvq_view(run, codec)
    if view is not None:
        return view, lambda: rvq_segment(view)
    view = tq_view(run, codec)
    if view is not None and not (keys and rotary_keys):  # TurboQuant keys are scored as stored (post-RoPE)
        return view, lambda: tq_segment(view)
    return None


def _run_arguments(run, codec, keys: bool, rotary_keys: bool, heads: int, dim: int) -> array.array | None:
    """The packed kernel arguments of one run, kept on the run until its blocks or buffers change (8 bytes an
    argument, plus the tensors they point at that neither the run nor its codec holds, normally none); None if no
    kernel reads it. A run read as one growing block (a prompt and its decode steps, `layout._as_one_block`) keeps
    its arguments across appends, brought up to date (`_grown_one_block`)."""
    rotary_keys = rotary_keys and isinstance(codec, TurboQuantCodec)  # only TurboQuant keys' arguments depend on it
    key = (*run_key(run, codec), keys, rotary_keys)
    memo = run.__dict__.get("_kvpack_args")  # (*key, args, foreign, one_block): one flat tuple
    if memo is not None:
        before, (args, foreign, one_block) = memo[:len(key)], memo[len(key):]
        if before == key:
            return args
        if one_block and before[0] == key[0] and before[2:] == key[2:]:  # only appends since (Run.edits)
            _grown_one_block(args, run)
            run.__dict__["_kvpack_args"] = (*key, args, foreign, one_block)
            return args
    found = _run_segment(run, codec, keys, rotary_keys)
    if found is None or found[1] is None or found[0].heads != heads or found[0].dim != dim:
        return None
    view, build = found
    args = _int64s(build())
    held = [*run.buffers.values(), *(t for t in vars(codec).values() if isinstance(t, torch.Tensor))]
    own = {t.untyped_storage().data_ptr() for t in held}
    foreign = [t for t in view_tensors(view) if t.untyped_storage().data_ptr() not in own]
    # one-token blocks read as one block (layout._as_one_block: count > 1 blocks, yet one block in the view)
    one_block = (isinstance(view, MixedNuqView) and run.block_tokens == 1 and run.count > 1 and view.nblk == 1
                 and view.batch == 1 and view.tokens == run.tokens and not foreign)
    if one_block:  # what _grown_one_block rewrites must be what was built
        again = array.array("q", args)
        _grown_one_block(again, run)
        one_block = again == args
    run.__dict__["_kvpack_args"] = (*key, args, foreign or None, one_block)
    return args


def _segments(stream, codec, keys: bool, heads: int, dim: int, rotary_keys: bool = False) -> array.array | None:
    """[count, segment args...] for a TokenStream (int64, joined in C: a run's kept arguments are copied, not
    converted), or None if a part has no kernel. `rotary_keys`: the kernel applies RoPE to decoded keys (pre-RoPE
    storage)."""
    out = _int64s([0])
    for part in (stream.head, *stream.body.runs, stream.tail):
        if part is None:
            continue
        if isinstance(part, torch.Tensor):
            seg = _fp16_segment(part)
            if seg is None:
                return None
            out.extend(seg)
        elif part.count:
            seg = _run_arguments(part, codec, keys, rotary_keys, heads, dim)
            if seg is None:
                return None
            out += seg
        else:
            continue
        out[0] += 1
    return out


def mixed_decode(run, codec, start: int, stop: int) -> torch.Tensor | None:
    """Run tokens start..stop-1 of a run of mixed-width NuqCodec blocks, decoded by the C++ kernels exactly as
    `codec.decode` decodes them: float32 [B, H, stop - start, D]; None where no kernel reads the run."""
    if not isinstance(codec, NuqCodec) or codec.channel_bits is None or load() is None or not run.count:
        return None
    if next(iter(run.buffers.values())).device.type != "cpu":
        return None
    if not 0 <= start <= stop <= run.tokens:
        raise ValueError(f"token range {start}..{stop} is not inside the run's {run.tokens} tokens")
    batch, heads, _, dim = run.block_shape
    keys = codec.axis == "channel"
    args = _run_arguments(run, codec, keys, False, heads, dim)
    if args is None:
        return None
    out = torch.empty(batch, heads, stop - start, dim, dtype=torch.float32)
    call = _int64s([batch, heads, dim, int(keys), start, stop, _ptr(out), *out.stride()[:3]]) + args
    code = load().kvpack_mixed_decode(call.buffer_info()[0])
    if code != 0:
        raise RuntimeError(f"kvpack_mixed_decode rejected its arguments (code {code})")
    return out


def _mask_args(mask: torch.Tensor | None, queries: int, tokens: int) -> list[int] | None:
    if mask is None:
        return [0, 0, 0, 0, 0, int(queries > 1)]
    if mask.device.type != "cpu" or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] < tokens:
        return None
    m = mask[..., mask.shape[-1] - tokens:]
    if m.dtype == torch.bool:
        kind = 1
    elif m.dtype == torch.float32:
        kind = 2
    else:
        return None
    sb = m.stride(0) if m.shape[0] > 1 else 0
    sq = m.stride(2) if m.shape[2] > 1 else 0
    return [_ptr(m), kind, sb, sq, m.stride(3), 0]


def layer_attention(layer, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None,
                    rope) -> torch.Tensor | None:
    """One layer's decode-step attention in one C call: query [B, Hq, Q, D] -> [B, Q, Hq, D] float32.

    None when some part has no kernel (an unsupported codec or mask); the caller then uses the per-run path.
    """
    batch, hq, queries, dim = query.shape
    heads = layer.k.head.shape[1] if layer.k.head is not None else (
        layer.k.body.runs[0].block_shape[1] if layer.k.body.runs else layer.k.tail.shape[1])
    if hq % heads or (hq // heads) * queries > 64 or dim % 8 or dim > 1024:
        return None
    tables = None
    if rope is not None:  # pre-RoPE keys: the kernel composes cos/sin at each position from the split tables
        tables = rope.kernel_tables()
        positions = rope.positions
        if tables is None or tables.rot % 16 or positions.dtype != torch.int32 or positions.stride(-1) != 1:
            return None
    tokens = layer.k.stored
    mask_args = _mask_args(mask, queries, tokens)
    keys = _segments(layer.k, layer.key_codec, True, heads, dim, rotary_keys=rope is not None)
    values = _segments(layer.v, layer.value_codec, False, heads, dim)
    if mask_args is None or keys is None or values is None:
        return None
    q = query if query.dtype == torch.float32 and query.stride(-1) == 1 else query.float().contiguous()
    if tables is None:
        rope_args = [0, 0, 0, 0, 0, 0]
    else:
        rope_args = [_ptr(positions), positions.stride(0) if positions.shape[0] > 1 else 0, _ptr(tables.hi),
                     _ptr(tables.lo), tables.shift, tables.rot]
    out = torch.empty(batch, queries, hq, dim, dtype=torch.float32)
    qs = q.stride()
    args = _int64s([q.data_ptr(), qs[0], qs[1], qs[2], batch, heads, hq // heads, queries, dim, tokens,
                    max(1, torch.get_num_threads()), _float_bits(scaling), out.data_ptr(), _float_bits(softcap or 0.0),
                    *mask_args, *rope_args]) + keys + values
    code = load().kvpack_layer(args.buffer_info()[0])
    if code != 0:
        raise RuntimeError(f"kvpack_layer rejected its arguments (code {code})")
    return out


def _outlier_buffers(codec, x: torch.Tensor, mode: int | None):
    """(mask, values, positions, counts, nnz) buffers the C encoders fill for `codec`'s outliers, or Nones."""
    if codec.outlier_frac <= 0:
        return None, None, None, None, None
    batch, heads, tokens, dim = x.shape
    rows = {1: batch * tokens, 2: batch * heads * tokens}.get(mode, batch * heads * dim)
    return (torch.empty(batch, heads, tokens, dim, dtype=torch.uint8), torch.empty(x.numel(), dtype=torch.float16),
            torch.empty(x.numel(), dtype=torch.int32), torch.empty(rows, dtype=torch.int32), torch.zeros(1, dtype=torch.int64))


def _outlier_tensors(buffers, mode: int | None, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sparse outlier tensors of a C encoder's filled `buffers` (empty without outliers)."""
    mask, values, positions, counts, nnz = buffers
    if mask is None:
        return {}
    batch, heads, tokens, dim = x.shape
    n = {1: heads * dim, 2: dim}.get(mode, tokens)
    used = int(nnz)
    return {"outlier_values": values[:used].clone(), "outlier_indices": positions[:used].to(sparse.index_dtype(max(n - 1, 0))),
            "outlier_counts": counts.to(sparse.index_dtype(n))}


def mixed_encode(codec, x: torch.Tensor):
    """`codec.encode(x)` for a NuqCodec with per-channel widths (x [B, H, T, D] on the CPU) by the C++ encoder,
    identical bytes; None if not covered (0-bit channels, a width group that is not a multiple of 8 channels)."""
    if not isinstance(codec, NuqCodec) or codec.channel_bits is None or x.dim() != 4 or x.device.type != "cpu":
        return None
    batch, heads, tokens, dim = x.shape
    if load() is None or heads != codec.heads or dim != codec.head_dim or dim % 8 or codec.outlier_scope != "vector":
        return None
    groups_of = codec.width_counts()  # (bits, channels) per width
    if int(codec.channel_bits.min()) < 1 or any(n % 8 for _, n in groups_of) or codec.bits > 8:
        return None
    mode = sparse_mode(codec)
    if codec.outlier_frac > 0 and mode is None:
        return None
    # the codec's fp16 levels (channel after channel), widths and ranges as they are held: the C side makes the
    # midpoints and each width's channel list per call
    fp16 = [codec.level_data] + ([codec.zero, codec.scale] if codec.axis == "channel" else [])
    if any(t.dtype != torch.float16 or not t.is_contiguous() for t in fp16) or not codec.channel_bits.is_contiguous():
        return None
    x = x.float().contiguous()
    tensors = {f"codes{b}": torch.empty(batch, tokens * n * b // 8, dtype=torch.uint8) for b, n in groups_of}
    groups = torch.tensor([v for b, n in groups_of for v in (b, n, _ptr(tensors[f"codes{b}"]))], dtype=torch.int64)
    span = heads if codec.span == "all" else 1
    k = outliers_per_side(codec.outlier_frac, span * dim) if codec.outlier_frac > 0 and codec.axis == "token" else 0
    if codec.axis == "token":
        zero = torch.empty(batch, heads // span, tokens, 1, dtype=torch.float16)
        scale = torch.empty_like(zero)
        tensors.update(zero=zero, scale=scale)
    buffers = _outlier_buffers(codec, x, mode)
    mask, values, positions, counts, nnz = buffers
    keyed = codec.axis == "channel"
    args = [_ptr(x), batch, heads, tokens, dim, int(not keyed), _ptr(codec.level_data), _ptr(codec.channel_bits),
            _ptr(codec.zero) if keyed else 0, _ptr(codec.scale) if keyed else 0, span, k, len(groups_of), _ptr(groups),
            _ptr(tensors.get("zero")), _ptr(tensors.get("scale")), _ptr(mask), mode or 0, _ptr(values), _ptr(positions),
            _ptr(counts), _ptr(nnz)]
    if load().kvpack_mixed_encode((ctypes.c_int64 * len(args))(*args)) != 0:
        return None
    tensors |= _outlier_tensors(buffers, mode, x)
    return Encoded(tensors, tuple(x.shape))


def nuq_encode(codec, x: torch.Tensor):
    """`codec.encode(x)` (a NuqCodec, x [B, H, T, D] on the CPU) by the C++ encoder, identical bytes; None if not covered.

    Appending one token costs one C call plus the sparse layout, instead of ~30 small torch ops.
    """

    if isinstance(codec, NuqCodec) and codec.channel_bits is not None:
        return mixed_encode(codec, x)
    if not isinstance(codec, NuqCodec) or x.dim() != 4 or x.device.type != "cpu" or load() is None:
        return None
    batch, heads, tokens, dim = x.shape
    if heads != codec.heads or dim != codec.head_dim or dim % 8 or codec.outlier_scope != "vector":
        return None
    if codec.levels.shape[0] not in (1, heads):
        return None
    mode = sparse_mode(codec)
    if codec.outlier_frac > 0 and mode is None:
        return None
    levels = codec.level_data  # fp16 [1 | H, 2**bits] as held: the C side makes the midpoints per call
    x = x.float().contiguous()
    codes = torch.empty(batch, heads, tokens * dim * codec.bits // 8, dtype=torch.uint8)
    buffers = _outlier_buffers(codec, x, mode)
    mask, values, positions, counts, nnz = buffers
    tensors = {"codes": codes}
    if codec.axis == "channel":  # the codec's fp16 zero and scale [H, 1, D] as held
        head = [_ptr(x), batch, heads, tokens, dim, codec.bits, 0, _ptr(levels), int(levels.shape[0] > 1),
                _ptr(codec.zero), _ptr(codec.scale), 1, 0, _ptr(codes), 0, 0]
    else:
        span = heads if codec.span == "all" else 1
        k = outliers_per_side(codec.outlier_frac, span * dim) if mask is not None else 0
        zero = torch.empty(batch, heads // span, tokens, 1, dtype=torch.float16)
        scale = torch.empty_like(zero)
        tensors.update(zero=zero, scale=scale)
        head = [_ptr(x), batch, heads, tokens, dim, codec.bits, 1, _ptr(levels), int(levels.shape[0] > 1), 0, 0, span, k,
                _ptr(codes), _ptr(zero), _ptr(scale)]
    args = head + [_ptr(mask), mode or 0, _ptr(values), _ptr(positions), _ptr(counts), _ptr(nnz)]
    if load().kvpack_nuq_encode((ctypes.c_int64 * len(args))(*args)) != 0:
        return None
    tensors |= _outlier_tensors(buffers, mode, x)
    return Encoded(tensors, tuple(x.shape))
