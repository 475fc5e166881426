"""KVPACK_CPU_ISA picks the widest vectors the C++ kernels are built with, and each choice is its own cached library.
(The AVX2 path is tested on any CPU by running the kernel tests with KVPACK_CPU_ISA=avx2; nothing here reads the CPU.)"""
import pytest

from kvpack.kernels import cpu


def test_isa_flags_and_library_key(monkeypatch):
    monkeypatch.delenv("KVPACK_CPU_ISA", raising=False)
    native = cpu.library_path()
    assert cpu.isa_flags() == []
    monkeypatch.setenv("KVPACK_CPU_ISA", "avx2")
    assert cpu.isa_flags() == ["-mno-avx512f"]
    assert cpu.library_path() != native  # another build, never a library of the other width
    monkeypatch.setenv("KVPACK_CPU_ISA", "AVX512")
    assert cpu.isa_flags() == [] and cpu.library_path() == native
    monkeypatch.setenv("KVPACK_CPU_ISA", "sse2")
    with pytest.raises(RuntimeError, match="KVPACK_CPU_ISA"):
        cpu.isa_flags()


def test_library_key_covers_every_header():
    """The cache key hashes cpu_kernels.cpp and every header it includes (editing a header rebuilds)."""
    headers = sorted(p.name for p in cpu.HEADERS.glob("*.h"))
    assert {"abi.h", "common.h", "mixed.h", "simd.h"} <= set(headers)
    source = cpu.SOURCE.read_text()
    assert all(f'"cpu_kernels/{h}"' in source or h == "simd.h" for h in headers)
    assert cpu.ABI_VERSION >= 12
