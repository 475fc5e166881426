"""Where a kvpack (or vLLM) serving run spends its time: one configuration of benchmarks/vllm_serving.py run in this
process (vLLM's engine core in-process) under cProfile, the top functions by own time printed.

    .venv-vllm/bin/python benchmarks/vllm_profile.py kvpack-3bit-bf16 --requests 12 --prompt 1024 --new 48
    .venv-vllm/bin/python benchmarks/vllm_profile.py vllm-bf16 --requests 12 --prompt 1024 --new 48
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a configuration name of vllm_serving.CONFIGS")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, so cProfile sees it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm_serving import CONFIGS, one

    from kvpack.hf.models import model_path

    profile = cProfile.Profile()
    result = profile.runcall(one, str(model_path("smollm2-135m")), CONFIGS[args.config], args.requests, args.prompt,
                             args.new, None)
    print(f"{args.config}: {result['wall_seconds']:.2f} s, {result['output_tokens_per_s']:.1f} output tokens/s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
