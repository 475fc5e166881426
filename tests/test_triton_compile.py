"""Ahead-of-time compile of the split-K decode kernels (nuq, mixed widths, TurboQuant, fp16, reduce) for sm_80 and
sm_90 (no GPU needed): Triton's passes and the bundled ptxas. Asserts what a GPU would get: no register spills, at
most 128 registers per thread, tl.dot on tensor cores (mma), shared memory within 48 KiB.

The compile runs in a subprocess without TRITON_INTERPRET (the interpreter tests in the same session replace
triton's JIT functions). Skipped, saying why, where triton or its CUDA backend/ptxas is unavailable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REGISTER_BUDGET = 128
CASES = dict(dims=(64, 128), bits=(2, 3, 4), groups=((4, 1),), archs=(80, 90))
SCRIPT = """
import json, sys
from kvpack.kernels import triton_decode as td
ok, why = td.aot_available()
if not ok:
    print(json.dumps({"skip": why})); sys.exit(0)
cases = json.loads(sys.argv[1])
cases["groups"] = [tuple(g) for g in cases["groups"]]
print(json.dumps({"rows": td.aot_rows(**cases)}))
"""


def _compile_all() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True, env=env,
                          timeout=600)
    if done.returncode != 0:
        pytest.fail(f"ahead-of-time compile failed:\n{done.stderr[-4000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in answer:
        pytest.skip(f"cannot compile for sm_80/sm_90 here: {answer['skip']}")
    return answer["rows"]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return _compile_all()


def test_every_kernel_and_target_compiled(rows):
    seen = {(r["kernel"], r["target"], r["head_dim"], r["bits"]) for r in rows}
    for target in ("sm_80", "sm_90"):
        for dim in CASES["dims"]:
            for bits in CASES["bits"]:
                assert ("nuq_split", target, dim, bits) in seen
            assert ("mixed_split", target, dim, None) in seen  # the kvpack presets (per-channel widths)
            assert ("tq_split", target, dim, None) in seen  # TurboQuant
            assert ("dense_split", target, dim, None) in seen and ("reduce", target, dim, None) in seen


def test_no_spills_and_register_budget(rows):
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["registers"] > REGISTER_BUDGET]
    assert not bad, json.dumps(bad, indent=1)


def test_split_kernels_use_tensor_cores_and_fit_shared_memory(rows):
    for r in rows:
        assert r["shared"] <= 48 * 1024, r
        if r["kernel"] != "reduce":
            assert r["tl_dot"] and r["padded_groups"] >= 16, r
