#!/usr/bin/env bash
# GPU checks for a session that has a CUDA device (none of this runs without one):
#  1. the CUDA tests: kernels compiled for the device vs decode-then-attend, CUDA-graph capture of a decode step,
#     the asynchronous activation checks on CUDA tensors, plus the interpreter and compile tests;
#  2. decode-attention timings of kvpack-3bit (mixed widths), kvquant-3bit-1pct and turboquant-3.5 vs torch SDPA in bf16 at
#     8K-128K tokens, batch 1 and 16 -> results/gpu-timing.json (benchmarks/triton_gpu_timing.py);
#  3. the vLLM plug-in's CUDA path without vLLM: page layouts of kvpack-3bit / kvquant-3bit-1pct / fp16 on the GPU,
#     the write path and the Triton page kernels vs the torch reference (read.attend), decode attention timed next to
#     bf16 SDPA at 1K-32K tokens -> results/vllm-pages-gpu.json (benchmarks/vllm_pages_gpu.py; exits 1 on a mismatch).
# Usage: benchmarks/gpu_check.sh [extra triton_gpu_timing.py args, e.g. --contexts 8192,32768]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
"$PY" - <<'PYEOF'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: nothing to check here"
print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name())
PYEOF
"$PY" -m pytest -q tests/test_triton_cuda.py tests/test_checks_async.py
"$PY" -m pytest -q tests/test_triton_mixed.py tests/test_triton_tq.py tests/test_triton_interpret.py tests/test_triton_compile.py
"$PY" -m pytest -q tests/test_vllm_triton_pages.py
"$PY" benchmarks/triton_gpu_timing.py "$@"
"$PY" benchmarks/vllm_pages_gpu.py --out results/vllm-pages-gpu.json
