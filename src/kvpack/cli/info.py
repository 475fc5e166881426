"""`kvpack info`: what this machine gives kvpack (versions, CPU and instruction set, compiler, the C++ kernels,
Triton, the device), for reports of problems; `--build` compiles the C++ kernels now (`make setup` does)."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

import torch
import typer

from kvpack.kernels import cpu, triton_attention


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(build: bool = False) -> dict:
    """Versions, CPU, compiler, kernel status and device as a dict (build: compile the C++ kernels if needed)."""
    path = cpu.library_path()
    if build or path.exists():
        kernels = "ready" if cpu.available() else cpu.error()
    else:
        kernels = "not built yet (built on first use, or `kvpack info --build`)"
    return {
        "kvpack": _version("kvpack"), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "triton": _version("triton"),
        "cpu": cpu.cpu_model(), "instruction_set": cpu.instruction_set(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "compiler": cpu.compiler(),
        "cpu_kernels": kernels,
        "cpu_kernels_library": str(path),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "triton_kernels": "ready" if triton_attention.available() else "unavailable (needs triton and a CUDA device)",
    }


def info_command(
    build: bool = typer.Option(False, "--build", help="Compile the C++ CPU kernels now if they are not built."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of aligned lines."),
) -> None:
    """Print what kvpack finds on this machine: versions, CPU and instruction set, compiler, kernels, device."""
    info = machine_info(build)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            typer.echo(f"{key:<{width}}  {value}")
    if build and info["cpu_kernels"] != "ready":
        print(f"kvpack: the C++ CPU kernels are unavailable ({info['cpu_kernels']}); attention uses the slower torch "
              "path.", file=sys.stderr)
