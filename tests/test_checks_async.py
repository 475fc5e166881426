"""codecs.checks: NaN/inf and beyond-fp16 activations are refused with the tensor named; at once on the CPU, and on
CUDA decode steps asynchronously (a device buffer read at safe points, no host sync). The deferred path runs here on
CPU tensors (defer=True); the CUDA routing itself is checked where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from kvpack.codecs import checks
from kvpack.errors import ActivationRangeError, NonFiniteError


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(checks, "_PENDING", {})


def _x(value: float, tokens: int = 1) -> torch.Tensor:
    x = torch.randn(1, 2, tokens, 8)
    x[0, 1, -1, 3] = value
    return x


@pytest.mark.parametrize("value,error", [(float("nan"), NonFiniteError), (float("inf"), NonFiniteError),
                                         (-float("inf"), NonFiniteError), (7e4, ActivationRangeError)])
def test_cpu_raises_at_once(value, error):
    with pytest.raises(error, match="layer 3 keys"):
        checks.check_storable(_x(value), "layer 3 keys")
    checks.check_storable(_x(6e4), "layer 3 keys")  # within fp16: fine
    checks.check_storable(torch.zeros(1, 2, 0, 8), "layer 3 keys")  # nothing stored: fine


def test_deferred_records_without_host_reads_then_raises_once(monkeypatch):
    def no_read(*args, **kwargs):
        raise AssertionError("a host read on the deferred path")

    with monkeypatch.context() as m:  # record must never read a value back
        for name in ("item", "tolist", "cpu", "__bool__", "__float__"):
            m.setattr(torch.Tensor, name, no_read)
        checks.check_storable(_x(1.0), "layer 0 keys", defer=True)
        checks.check_storable(_x(float("nan")), "layer 1 values", defer=True)
        checks.check_storable(_x(8e4), "layer 2 keys", defer=True)
        checks.check_storable(_x(1.0), "layer 1 values", defer=True)  # a later fine step keeps the NaN
    with pytest.raises(NonFiniteError, match="layer 1 values.*asynchronously"):
        checks.raise_pending()
    checks.raise_pending()  # read and cleared: nothing left


def test_deferred_range_error_names_the_peak():
    for step in range(3):
        checks.check_storable(_x(1e5 if step == 1 else 2.0), "layer 7 values", defer=True)
    with pytest.raises(ActivationRangeError, match=r"layer 7 values .*reach 1e\+05"):
        checks.pending_checks("cpu").raise_pending()


def test_next_prefill_is_a_safe_point():
    """What decode steps recorded surfaces at the next immediate check, before that check's own tensor."""
    checks.check_storable(_x(float("inf")), "layer 4 keys", defer=True)
    with pytest.raises(NonFiniteError, match="layer 4 keys"):
        checks.check_storable(_x(1.0, tokens=5), "layer 0 keys")
    checks.check_storable(_x(1.0, tokens=5), "layer 0 keys")


def test_buffer_grows_past_its_capacity():
    pending = checks.PendingChecks("cpu", capacity=2)
    for i in range(5):
        pending.record(_x(1.0), f"t{i}")
    pending.record(_x(float("nan")), "t4")
    with pytest.raises(NonFiniteError, match="t4"):
        pending.raise_pending()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_steps_defer_and_prefill_checks_at_once():
    dev = torch.device("cuda")
    checks.check_storable(_x(float("nan")).to(dev), "layer 0 keys")  # one token: recorded, not raised
    with pytest.raises(NonFiniteError, match="layer 0 keys"):
        checks.raise_pending(dev)
    with pytest.raises(ActivationRangeError, match="layer 1 keys"):
        checks.check_storable(_x(7e4, tokens=4).to(dev), "layer 1 keys")  # a prefill chunk: at once
