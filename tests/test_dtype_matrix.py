"""Every dtype (float32, bfloat16, float16) x attention implementation (sdpa, eager) x method family through
the real cache on tiny models, against the same model's DynamicCache: nothing crashes, nothing is non-finite,
the packed path reads the same bits as decode-then-attend, the lossless method agrees token for token."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import kvpack
from kvpack.evaluate.dtype_matrix import ATTENTIONS, DTYPES, model_in, run_cell
from kvpack.methods import needs_calibration, parse_method
from kvpack.recipes import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["fp16:pre-rope:sink1", "int4:pre-rope:key-channel:g8", "kivi-2:recent8:g8", "kvquant-3bit-1pct",
           "kvpack-3bit:budget48", "rvq-d2-c16-g8:1pct", "turboquant-3.5bit"]
IDS = torch.randint(3, 120, (1, 44), generator=torch.Generator().manual_seed(5))
PREFILL = 32  # then 12 decode steps


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict:
    """Recipes calibrated once on the float32 models (a recipe belongs to the weights, not their dtype)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    words = torch.randint(0, 100, (800,), generator=torch.Generator().manual_seed(0))
    path.write_text(" ".join(f"w{int(i)}" for i in words))
    out = {}
    for arch in ("llama", "gemma2"):
        model, tok = make_tiny_model(arch, "eager" if arch == "gemma2" else "sdpa"), make_tiny_tokenizer()
        for name in METHODS:
            settings = parse_method(name)
            out[arch, name] = (kvpack.calibrate(model, tok, settings, data=str(path), windows=3, seqlen=64, progress=False)
                               if needs_calibration(settings) else Recipe.baseline(settings, model.config.num_hidden_layers))
    return out


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 0.1  # logits of the tiny models are O(1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("method", METHODS)
def test_llama_cell(method, attn, dtype, recipes):
    model = model_in(make_tiny_model("llama"), DTYPES[dtype], attn)
    cell = run_cell(model, recipes["llama", method], IDS, PREFILL, block_tokens=8)
    assert cell["finite"], cell
    assert cell["max_logit_diff_vs_decoded"] <= _tolerance(DTYPES[dtype]), cell
    assert sum(cell["paths"].values()) == 2 * cell["decode_steps"]  # every decode step of both layers was packed
    if method.startswith("fp16"):
        assert cell["top1"] == 1.0, cell


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["kvquant-3bit-1pct", "kvpack-3bit:budget48", "turboquant-3.5bit"])
def test_gemma2_eager_half_precision(method, dtype, recipes):
    """Gemma 2 (eager attention, softcap, sliding-window layers) in half precision through the real cache."""
    model = model_in(make_tiny_model("gemma2", "eager"), DTYPES[dtype], "eager")
    cell = run_cell(model, recipes["gemma2", method], IDS, PREFILL, block_tokens=8)
    assert cell["finite"], cell
    assert cell["max_logit_diff_vs_decoded"] <= _tolerance(DTYPES[dtype]), cell


def test_bf16_eager_uses_the_cpu_kernels_when_built(recipes):
    """An additive bf16 mask (eager attention in bf16) no longer pushes the C++ path onto a dead per-run level."""
    from kvpack.kernels import cpu

    if not cpu.available():
        pytest.skip(f"C++ kernels unavailable here: {cpu.error()}")
    model = model_in(make_tiny_model("llama"), torch.bfloat16, "eager")
    cell = run_cell(model, recipes["llama", "kvquant-3bit-1pct"], IDS, PREFILL, block_tokens=8)
    assert set(cell["paths"]) == {"cpu"}, cell
