"""Shared fixtures: offline data location, tiny random RoPE models, a tiny tokenizer, SmolLM2.

Everything here works offline. `KVPACK_DATA` defaults to the shared data folder next to the
repository; `KVPACK_CACHE` is left alone on purpose so the dequantized default model is
converted once (under ~/.cache/kvpack) and reused by every later run.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("KVPACK_DATA", str((REPO / ".." / "shared" / "data").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def shared_corpora() -> Path:
    """$KVPACK_DATA holding the shared WikiText-2 and C4 files; tests that read them skip, saying why, elsewhere."""
    root = Path(os.environ["KVPACK_DATA"])
    missing = [f for f in ("wikitext-2-raw/wiki.test.raw", "c4/c4-validation-sample.jsonl") if not (root / f).is_file()]
    if missing:
        pytest.skip(f"shared corpora not found under KVPACK_DATA={root} ({', '.join(missing)}); set KVPACK_DATA")
    return root


VOCAB = 128
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: two query heads per KV head
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

# (architecture, attention implementation). Gemma2 has no SDPA path in transformers, so it is the
# eager representative together with an eager Llama.
TINY_ARCHS = [
    ("llama", "sdpa"),
    ("llama", "eager"),
    ("qwen2", "sdpa"),
    ("mistral", "sdpa"),
    ("gemma2", "eager"),
    ("gemma3", "sdpa"),
]


def tiny_config(arch: str, **overrides):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    kwargs = dict(COMMON)
    if arch == "llama":
        cls = LlamaConfig
    elif arch == "qwen2":
        cls = Qwen2Config
    elif arch == "mistral":
        cls = MistralConfig
        kwargs["sliding_window"] = 4096
    elif arch == "gemma2":
        cls = Gemma2Config
        kwargs.update(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    elif arch == "gemma3":
        cls = Gemma3TextConfig
        kwargs.update(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(arch)
    kwargs.update(overrides)
    return cls(**kwargs)


def make_tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    """A deterministic tiny random causal LM in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def torch_threads(n: int):
    """Run torch on `n` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread():
    """Run torch on one intra-op thread inside the block. The test machine's cores are shared:
    with other jobs running, the thread pool's oversubscription stalls made a SmolLM2 forward 5x
    and tiny-model tests 4x slower than on one thread."""
    return torch_threads(1)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(params=TINY_ARCHS, ids=[f"{a}-{i}" for a, i in TINY_ARCHS])
def tiny_model(request):
    """Each tiny architecture in turn (fresh model per test: tests may add hooks)."""
    arch, attn = request.param
    return make_tiny_model(arch, attn)


@pytest.fixture
def tiny_ids():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (2, 40), generator=g)


def make_tiny_tokenizer():
    """A whitespace word-level tokenizer: word `wK` -> id K (K < 125), anything else -> [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"[UNK]": VOCAB - 3, "[BOS]": VOCAB - 2, "[EOS]": VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


class FakeTokenizer:
    """Minimal tokenizer: one token per whitespace-separated word (id = running word index mod 1000),
    plus an optional BOS id 999 at the start, the way HF tokenizers add default special tokens."""

    def __init__(self, bos: bool = False):
        self.bos = bos
        self.calls = 0

    def __call__(self, text, return_tensors=None, return_attention_mask=True):
        self.calls += 1
        ids = [999] if self.bos else []
        ids += [i % 1000 for i, _ in enumerate(text.split())]
        out = {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else [ids]}
        if return_attention_mask:
            out["attention_mask"] = torch.ones(1, len(ids), dtype=torch.long)
        return out


@pytest.fixture
def fake_tokenizer():
    return FakeTokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model; converted once into the kvpack cache."""
    from kvpack.hf.models import load_model

    with single_thread():
        return load_model("smollm2-135m")


def tiny_mixed_recipe(method: str, calib_text: Path):
    """(tiny llama model, tokenizer, recipe of `method` calibrated on 3 windows of 64 tokens of `calib_text`)."""
    import kvpack

    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    return model, tok, kvpack.calibrate(model, tok, method, data=str(calib_text), windows=3, seqlen=64, progress=False)


@pytest.fixture(scope="module")
def mixed_calib_text(tmp_path_factory) -> Path:
    """1,200 random words: calibration text for the tiny mixed-width recipes."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (1200,), generator=g)))
    return path
