"""Light fine-tuning with the RVQ quantizer in the loop, on a tiny random Llama (no download)."""
from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, make_tiny_model
from kvpack.recipes.calibrate import calibrate_windows
from kvpack.errors import MethodError, RecipeError
from kvpack.finetune.train import FinetuneConfig, STEQuantizer, apply_finetuned, finetune_lora, quantized_nll, save_finetuned, FinetuneResult
from kvpack.hf.attention import intercept_kv
from kvpack.finetune.lora import LoRALinear, add_lora, remove_lora
from kvpack.methods.names import parse_method
from kvpack.recipes.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(model, method: str = "rvq-d2-c16-g8") -> Recipe:
    """Calibrate `method` on random token windows through kvpack.recipes.calibrate (the rvq fitter dispatch)."""
    g = torch.Generator().manual_seed(7)
    calib = torch.randint(3, VOCAB, (4, 64), generator=g)
    return calibrate_windows(model, calib, parse_method(method), "random tokens", progress=False)


def train_ids() -> torch.Tensor:
    # a learnable pattern: repeated short sequences
    g = torch.Generator().manual_seed(3)
    base = torch.randint(3, VOCAB, (4, 8), generator=g)
    return base.repeat(1, 4)  # [4, 32]


def test_straight_through_forward_is_quantized_and_gradients_pass():
    model = make_tiny_model("llama")
    recipe = tiny_recipe(model)
    quantizer = STEQuantizer(recipe, ema=False)
    x = torch.randn(1, 2, 10, 16, requires_grad=True)
    y = quantizer._quantize(x, recipe.key_codecs[0], (0, "keys"))
    codec = recipe.key_codecs[0]
    assert torch.allclose(y, codec.decode(codec.encode(x.detach())), atol=1e-5)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))  # straight through
    assert len(quantizer.losses) == 1 and quantizer.losses[0] > 0


def test_finetune_step_changes_weights_and_lowers_quantized_loss():
    model = make_tiny_model("llama")
    recipe = tiny_recipe(model)
    ids = train_ids()
    before = quantized_nll(model, recipe, ids)
    books_before = recipe.key_codecs[1].codebooks.clone()
    config = FinetuneConfig(steps=30, batch_size=4, lr=1e-2, rank=4, alpha=8, seed=0)
    wrapped, log = finetune_lora(model, ids, recipe, config, progress=False)
    assert all(lora.lora_b.abs().sum() > 0 for lora in wrapped.values())  # adapters moved from zero
    assert not torch.equal(recipe.key_codecs[1].codebooks, books_before)  # codebooks kept learning by EMA
    assert log[-1]["loss"] < log[0]["loss"]
    after = quantized_nll(model, recipe, ids)
    assert after < before - 0.05, (before, after)


def test_adapter_saves_merges_and_reloads(tmp_path):
    model = make_tiny_model("llama")
    recipe = tiny_recipe(model)
    ids = train_ids()
    config = FinetuneConfig(steps=3, batch_size=2, lr=1e-2, rank=2, alpha=4)
    wrapped, log = finetune_lora(model, ids, recipe, config, progress=False)
    with torch.no_grad():
        wrapped_logits = model(ids).logits
    save_finetuned(wrapped, FinetuneResult(recipe=recipe, log=log), config, tmp_path)
    remove_lora(model, merge=False)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())

    fresh = make_tiny_model("llama")  # same seed: the same base weights
    loaded = apply_finetuned(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, wrapped_logits, atol=1e-4)
    assert torch.equal(loaded.key_codecs[0].codebooks, recipe.key_codecs[0].codebooks)
    assert loaded.calibration["finetune"]["config"]["rank"] == 2
    assert loaded.calibration["timing_s"]["rvq_fit"] > 0  # calibrated through kvpack.recipes.calibrate
    with pytest.raises(RecipeError, match="no fine-tuned adapter"):
        apply_finetuned(fresh, tmp_path / "missing")


def test_merge_equals_wrapped_and_quantizer_needs_rvq():
    model = make_tiny_model("llama")
    ids = train_ids()
    wrapped = add_lora(model, rank=2)
    for lora in wrapped.values():
        torch.nn.init.normal_(lora.lora_b)
    with torch.no_grad():
        expected = model(ids).logits
    remove_lora(model, merge=True)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)
    with pytest.raises(MethodError, match="rvq"):
        STEQuantizer(Recipe.baseline("int4", 2))


def test_sink_tokens_pass_unquantized():
    model = make_tiny_model("llama")
    recipe = tiny_recipe(model, "rvq-d2-c16-g8:sink2")
    seen = {}
    quantizer = STEQuantizer(recipe, ema=False)
    x = torch.randn(1, 2, 6, 16)
    k, _ = quantizer(0, x, x)
    assert torch.equal(k[..., :2, :], x[..., :2, :]) and not torch.equal(k[..., 2:, :], x[..., 2:, :])
    with intercept_kv(model, quantizer), torch.no_grad():
        seen["logits"] = model(train_ids()).logits
    assert torch.isfinite(seen["logits"]).all()


def test_run_eval_with_finetuned_folder(tmp_path):
    """`kvpack eval --finetuned DIR`: the adapter is merged for every row (fp16 differs from the base
    model's), the tuned method uses the saved codebooks, rows name the tuned model."""
    from conftest import make_tiny_tokenizer
    from kvpack.evaluate.run import run_eval

    model_dir = tmp_path / "tiny"
    base = make_tiny_model("llama")
    base.save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    model = make_tiny_model("llama")
    recipe = tiny_recipe(model)
    config = FinetuneConfig(steps=5, batch_size=2, lr=3e-2, rank=2, alpha=4)
    wrapped, log = finetune_lora(model, train_ids(), recipe, config, progress=False)
    save_finetuned(wrapped, FinetuneResult(recipe=recipe, log=log), config, tmp_path / "ft")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(200)))
    plain = run_eval(str(model_dir), str(text), ["fp16"], seqlen=32, max_windows=2, progress=False)
    tuned = run_eval(str(model_dir), str(text), ["fp16"], seqlen=32, max_windows=2, progress=False,
                     finetuned=tmp_path / "ft")
    assert [r["method"] for r in tuned] == ["fp16", recipe.settings.name]
    assert tuned[0]["model"] == f"{model_dir}+ft"
    assert tuned[0]["ppl"] != plain[0]["ppl"]  # the adapter is in the model
    assert tuned[1]["bits_per_element"] < 16
