"""Triton kernels under the interpreter on the CPU, in a process that may already have imported triton."""
from __future__ import annotations

import os
import sys


def use_interpreter() -> None:
    """Set TRITON_INTERPRET=1 (before triton decorates kernels). triton decorates its own library functions
    (tl.argmin, tl.cdiv, ...) when triton.language is imported; if an earlier import (transformers probes for
    triton) did that without the interpreter, give those names interpreted twins so kernels run under the
    interpreter in the same process."""
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton.language" not in sys.modules:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins: dict = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("triton.language"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):  # keyed by id: hashing a JITFunction analyses its dependencies
                if id(value) not in twins:
                    twins[id(value)] = InterpretedFunction(value.fn)
                setattr(module, attr, twins[id(value)])
