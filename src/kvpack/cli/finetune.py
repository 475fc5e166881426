"""`kvpack finetune`: a LoRA adapter trained with the RVQ quantizer in the forward pass."""
from __future__ import annotations

from pathlib import Path

import typer

from kvpack.cli.options import Model, Progress, fail, log
from kvpack.errors import KVPackError
from kvpack.finetune.train import FinetuneConfig, ppl, run_finetune


def finetune_command(
    model: Model = "smollm2-135m",
    recipe: Path = typer.Option(..., help="A calibrated rvq-* recipe folder (`kvpack calibrate --method rvq-... --out DIR`)."),
    out: Path = typer.Option(..., help="Folder for the fine-tuned recipe (codebooks) and LoRA adapter."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    seqlen: int = typer.Option(256, help="Tokens per training window."),
    batch_size: int = typer.Option(1, help="Windows per step."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate of the adapter."),
    rank: int = typer.Option(8, help="LoRA rank (q/k/v/o projections)."),
    data: str = typer.Option("c4[:500]", help="Training text: calibration data only (never the evaluation set)."),
    ema: bool = typer.Option(True, help="Keep updating the codebooks by EMA while training."),
    progress: Progress = True,
) -> None:
    """Fine-tune a LoRA adapter with the RVQ quantizer in the forward pass (straight-through, commitment 0.25)."""
    config = FinetuneConfig(steps=steps, seqlen=seqlen, batch_size=batch_size, lr=lr, rank=rank, data=data, ema=ema)
    try:
        result = run_finetune(model, recipe, out, config, progress=progress)
    except KVPackError as exc:
        fail(exc)
    if result.val_nll_before is not None:
        log(f"held-out calibration windows, quantized: ppl {ppl(result.val_nll_before):.3f} -> {ppl(result.val_nll_after):.3f}")
    typer.echo(f"wrote {out} (recipe + adapter, {steps} steps in {result.seconds:.0f} s)")
