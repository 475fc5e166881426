"""The `kvpack` command line: eval, report, demo (calibrate, generate, bench, plan join as they land)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from kvpack.errors import KVPackError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress the KV cache of transformer LMs and measure it.")


@app.callback()
def main(
    threads: Optional[int] = typer.Option(None, envvar="KVPACK_THREADS", help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Compress the KV cache of transformer LMs and measure it."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _split_methods(methods: str) -> list[str]:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    return names


def run_eval(
    model_spec: str, data: str, methods: list[str], seqlen: int, max_windows: Optional[int],
    pre_rope: Optional[bool] = None, key_axis: Optional[str] = None, calib_data: str = "c4[:500]",
    calib_windows: int = 16, recipe_dir: Optional[Path] = None, progress: bool = True,
    cache: str = "simulated", chunk: int = 1, json_out: Optional[Path] = None, resume: bool = False,
    finetuned: Optional[Path] = None,
) -> list[dict]:
    """Evaluate `methods` (fp16 always included, first) and return result rows.

    cache: "simulated" (quantize-dequantize inside one forward), "real" (stream each window through
    CompressedCache, prefilling `chunk` tokens at a time) or "both" (one row per mode).
    With `json_out` the rows are written after every method, so a long run keeps what it finished;
    `resume` keeps the rows already in `json_out` for the same model, data, seqlen and windows.
    `finetuned` (a `kvpack finetune` output) merges its LoRA adapter into the model for every row
    (the fp16 row is then the tuned model's) and gives its method the tuned codebooks; rows say
    `model = "<model>+<folder name>"`."""
    from kvpack.data import load_windows
    from kvpack.evaluate.perplexity import simulated_perplexity
    from kvpack.evaluate.results import add_deltas, read_rows, write_rows
    from kvpack.methods.names import parse_method
    from kvpack.hf.models import load_model
    from kvpack.recipes.resolve import resolve_recipe

    settings = [parse_method(m, pre_rope=pre_rope, key_axis=key_axis) for m in methods]
    if not any(s.name == "fp16" for s in settings):
        settings.insert(0, parse_method("fp16"))
    model, tokenizer = load_model(model_spec)
    tuned = None
    if finetuned is not None:
        from kvpack.finetune.train import apply_finetuned

        tuned = apply_finetuned(model, finetuned)
        model_spec = f"{model_spec}+{Path(finetuned).name}"
        if not any(s.name == tuned.settings.name for s in settings):
            settings.append(tuned.settings)
    windows = load_windows(tokenizer, data, seqlen, max_windows)
    rows = []
    if resume and json_out is not None and Path(json_out).is_file():
        same = dict(model=model_spec, data=data, seqlen=seqlen, windows=len(windows))
        rows = [r for r in read_rows(json_out) if all(r.get(k) == v for k, v in same.items())]
    for s in settings:
        todo = [m for m in _cache_modes(cache) if not any(r["method"] == s.name and r["mode"] == m for r in rows)]
        if not todo:
            continue
        if tuned is not None and s.name == tuned.settings.name:
            recipe = tuned
        else:
            recipe = resolve_recipe(model, tokenizer, s, calib_data=calib_data, calib_windows=calib_windows,
                                    calib_seqlen=seqlen, recipe_dir=recipe_dir, progress=progress)
        for mode in todo:
            if mode == "real":
                from kvpack.evaluate.streaming import streaming_perplexity

                result = streaming_perplexity(model, windows, recipe, chunk=chunk, progress=progress)
            else:
                result = simulated_perplexity(model, windows, recipe, progress=progress)
            rows.append(_eval_row(result, recipe, model_spec, data, seqlen, mode, chunk))
            if json_out is not None:
                write_rows(json_out, add_deltas(rows))
    return add_deltas(rows)


def _cache_modes(cache: str) -> list[str]:
    modes = {"simulated": ["simulated"], "real": ["real"], "both": ["simulated", "real"]}
    if cache not in modes:
        raise KVPackError(f"--cache must be one of {', '.join(modes)}, got '{cache}'.")
    return modes[cache]


def _eval_row(result, recipe, model_spec: str, data: str, seqlen: int, mode: str, chunk: int) -> dict:
    from kvpack.evaluate.results import environment

    row = {
        "method": result.method, "bits_per_element": result.bits_per_element, "ppl": result.ppl,
        "nll": result.nll, "model": model_spec, "data": data, "seqlen": seqlen, "windows": result.windows,
        "tokens": result.tokens, "mode": mode, "seconds": result.seconds,
        "seconds_per_window": result.seconds / result.windows, "calibration": recipe.calibration or None,
        "env": environment(),
    }
    if mode == "real":
        row["chunk"] = chunk
    typer.echo(f"{result.method} [{mode}]: ppl {result.ppl:.4f}  bits/elem {result.bits_per_element:.3f}  "
               f"({result.seconds:.1f} s, {result.seconds / result.windows:.2f} s/window)", err=True)
    return row


@app.command("eval")
def eval_command(
    model: str = typer.Option("smollm2-135m", help="Short name, local directory, hub id, or .gguf file."),
    data: str = typer.Option("wikitext2", help="wikitext2 | c4 | PATH (.jsonl with 'text', or plain text); c4[500:] slices documents."),
    methods: str = typer.Option("fp16,int4,kivi-2", help="Comma-separated methods; options follow ':' (int4:pre-rope:key-channel)."),
    seqlen: int = typer.Option(2048, help="Tokens per window."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate only the first N windows."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows to this JSON file."),
    pre_rope: Optional[bool] = typer.Option(None, "--pre-rope/--post-rope", help="Quantize keys before / after RoPE for every method."),
    key_axis: Optional[str] = typer.Option(None, help="'channel' or 'token': the axis keys share statistics along, for every method."),
    calib_data: str = typer.Option("c4[:500]", help="Calibration data for methods that need it (default: the first 500 C4 documents; evaluate C4 on c4[500:] to stay held out)."),
    calib_windows: int = typer.Option(16, help="Calibration windows (of --seqlen tokens)."),
    recipe: Optional[Path] = typer.Option(None, help="Use this saved recipe instead of calibrating."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    cache: str = typer.Option("simulated", help="simulated | real (stream windows through CompressedCache) | both."),
    chunk: int = typer.Option(1, help="With --cache real: tokens fed per forward (1 = the exact decode path)."),
    resume: bool = typer.Option(False, help="Keep rows already in --json for the same model/data/seqlen/windows; run only the rest."),
    task: str = typer.Option("perplexity", help="perplexity | passkey (a 5-digit key in filler text, through the real cache)."),
    lengths: str = typer.Option("1024,2048,4096,8000", help="--task passkey: prompt lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="--task passkey: where the key sits (0 = start, 1 = end)."),
    trials: int = typer.Option(2, help="--task passkey: keys per length and depth."),
    plot: Optional[Path] = typer.Option(None, help="--task passkey: heat map PNG."),
    finetuned: Optional[Path] = typer.Option(None, help="A `kvpack finetune` output: merge its adapter into the model for every row; its method uses the tuned codebooks."),
) -> None:
    """Perplexity of each method (simulated quantization or the real compressed cache), next to fp16 measured in the same run;
    or passkey retrieval accuracy (--task passkey)."""
    from kvpack.evaluate.results import PPL_COLUMNS, text_table

    if task == "passkey":
        from kvpack.evaluate import passkey
        from kvpack.evaluate.results import write_rows

        try:
            rows = passkey.run_passkey_eval(model, _split_methods(methods), [int(x) for x in lengths.split(",")],
                                            [float(x) for x in depths.split(",")], trials, calib_data, calib_windows,
                                            seqlen, recipe, progress, log=lambda s: typer.echo(s, err=True))
        except KVPackError as exc:
            _fail(exc)
        typer.echo(passkey.table(rows))
        if json_out:
            write_rows(json_out, rows)
            summary = Path(json_out).with_name(Path(json_out).stem + "-by-length.json")
            write_rows(summary, passkey.by_length(rows))
            typer.echo(f"wrote {json_out} and {summary}", err=True)
        if plot:
            typer.echo(f"wrote {passkey.heatmap(rows, plot)}", err=True)
        return
    if task != "perplexity":
        _fail(KVPackError(f"unknown --task '{task}' (perplexity | passkey)"))
    try:
        rows = run_eval(model, data, _split_methods(methods), seqlen, max_windows, pre_rope, key_axis,
                        calib_data, calib_windows, recipe, progress, cache=cache, chunk=chunk,
                        json_out=json_out, resume=resume, finetuned=finetuned)
    except KVPackError as exc:
        _fail(exc)
    columns = PPL_COLUMNS if cache == "simulated" else [PPL_COLUMNS[0], ("mode", "cache"), *PPL_COLUMNS[1:]]
    typer.echo(text_table(rows, columns))
    if json_out:
        typer.echo(f"wrote {json_out}", err=True)


@app.command("calibrate")
def calibrate_command(
    model: str = typer.Option("smollm2-135m", help="Short name, local directory, hub id, or .gguf file."),
    method: str = typer.Option("kvquant-3bit-1pct", help="Calibrated method, options after ':' (kvquant-3bit-1pct:sink4)."),
    data: str = typer.Option("c4[:500]", help="Calibration text: c4 | wikitext2 | PATH; c4[:500] (default) slices documents, leaving c4[500:] held out."),
    windows: int = typer.Option(16, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    out: Path = typer.Option(..., help="Folder to write the recipe to (recipe.json + codecs.safetensors)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Calibrate a method for a model and save the recipe; use it with `kvpack eval --recipe DIR`."""
    from kvpack.recipes.calibrate import calibrate
    from kvpack.hf.models import load_model

    try:
        loaded, tokenizer = load_model(model)
        recipe = calibrate(loaded, tokenizer, method, data=data, windows=windows, seqlen=seqlen, progress=progress)
        recipe.save(out)
    except KVPackError as exc:
        _fail(exc)
    timing = (recipe.calibration or {}).get("timing_s", {})
    typer.echo(f"wrote {out} ({recipe.method}, {recipe.num_layers} layers"
               + (f", calibrated in {timing['total']:.1f} s)" if "total" in timing else ")"))


@app.command("finetune")
def finetune_command(
    model: str = typer.Option("smollm2-135m", help="Short name, local directory, hub id, or .gguf file."),
    recipe: Path = typer.Option(..., help="A calibrated rvq-* recipe folder (`kvpack calibrate --method rvq-... --out DIR`)."),
    out: Path = typer.Option(..., help="Folder for the fine-tuned recipe (codebooks) and LoRA adapter."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    seqlen: int = typer.Option(256, help="Tokens per training window."),
    batch_size: int = typer.Option(1, help="Windows per step."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate of the adapter."),
    rank: int = typer.Option(8, help="LoRA rank (q/k/v/o projections)."),
    data: str = typer.Option("c4[:500]", help="Training text: calibration data only (never the evaluation set)."),
    ema: bool = typer.Option(True, help="Keep updating the codebooks by EMA while training."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Fine-tune a LoRA adapter with the RVQ quantizer in the forward pass (straight-through, commitment 0.25)."""
    from kvpack.finetune.train import FinetuneConfig, ppl, run_finetune

    config = FinetuneConfig(steps=steps, seqlen=seqlen, batch_size=batch_size, lr=lr, rank=rank, data=data, ema=ema)
    try:
        result = run_finetune(model, recipe, out, config, progress=progress)
    except KVPackError as exc:
        _fail(exc)
    if result.val_nll_before is not None:
        typer.echo(f"held-out calibration windows, quantized: ppl {ppl(result.val_nll_before):.3f} -> "
                   f"{ppl(result.val_nll_after):.3f}", err=True)
    typer.echo(f"wrote {out} (recipe + adapter, {steps} steps in {result.seconds:.0f} s)")


@app.command()
def report(
    results: Path = typer.Option(Path("results"), help="Folder of JSON results."),
    readme: Path = typer.Option(Path("README.md"), help="README whose <!-- results:NAME --> blocks are refreshed."),
    check: bool = typer.Option(False, help="Exit 1 if the README is not up to date instead of writing it."),
) -> None:
    """Render the README's result tables from the saved JSON results."""
    from kvpack.evaluate.report import render_readme

    text = render_readme(readme, results)
    if check:
        if text != readme.read_text():
            typer.echo(f"{readme} is out of date: run `kvpack report`.", err=True)
            raise typer.Exit(1)
        typer.echo(f"{readme} is up to date.")
        return
    readme.write_text(text)
    typer.echo(f"refreshed {readme} from {results}/")


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Model to run."),
    method: str = typer.Option("kvquant-4bit-1pct", help="Recipe for the compressed cache (calibrated on first use, then cached)."),
    data: str = typer.Option("wikitext2", help="Where the long prompt comes from (a WikiText-2 article)."),
    prompt_tokens: int = typer.Option(2048, help="Prompt length in tokens."),
    new_tokens: int = typer.Option(64, help="Tokens to generate greedily."),
    calib_windows: int = typer.Option(4, help="Calibration windows of 2048 C4 tokens for a calibrated method."),
) -> None:
    """The main job: compress a long real prompt's cache, generate next to fp16, report memory and agreement."""
    from kvpack.evaluate.demo import run_demo

    start = time.perf_counter()
    try:
        run_demo(model, method, data, prompt_tokens, new_tokens, calib_windows, out=typer.echo)
    except KVPackError as exc:
        _fail(exc)
    typer.echo(f"demo finished in {time.perf_counter() - start:.0f} s")


@app.command()
def bench(
    model: str = typer.Option("smollm2-135m", help="Short name, local directory, hub id, or .gguf file."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    contexts: str = typer.Option("1024,8192,32768", help="Comma-separated context lengths (tokens in the cache)."),
    batch: int = typer.Option(1, help="Sequences decoded together."),
    methods: str = typer.Option("fp16,kvquant-4bit-1pct,kvquant-3bit-1pct", help="Comma-separated methods; fp16 is always measured."),
    rounds: int = typer.Option(7, help="Interleaved timing rounds (medians reported)."),
    source_tokens: int = typer.Option(512, help="Tokens of real text whose K/V are repeated to fill the caches."),
    data: str = typer.Option("wikitext2", help="Text the K/V come from."),
    calib_data: str = typer.Option("c4[:500]", help="Calibration data for calibrated methods."),
    calib_windows: int = typer.Option(2, help="Calibration windows (a small calibration is enough for speed)."),
    calib_seqlen: int = typer.Option(512, help="Tokens per calibration window."),
    recipe: Optional[Path] = typer.Option(None, help="Use this saved recipe instead of calibrating."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows to this JSON file."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Latency vs context PNG."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Decode-step latency (attention alone, whole model), compression throughput and memory vs the fp16 cache."""
    from kvpack.evaluate.results import text_table, write_rows
    from kvpack.evaluate.speed import BENCH_COLUMNS, plot, run_bench

    try:
        rows = run_bench(model, device, [int(c) for c in contexts.split(",") if c.strip()], batch,
                         _split_methods(methods), rounds=rounds, source_tokens=source_tokens, data=data,
                         calib_data=calib_data, calib_windows=calib_windows, calib_seqlen=calib_seqlen,
                         recipe_dir=recipe, progress=progress, log=lambda s: typer.echo(s, err=True))
    except (KVPackError, RuntimeError) as exc:
        _fail(exc)
    typer.echo(text_table(rows, BENCH_COLUMNS))
    if rows:
        typer.echo(f"caches filled with {rows[0]['kv_source']}, {rows[0]['fill']}; "
                   f"{rows[0]['threads']} threads; ratios are method / fp16 measured in the same run")
    if json_out:
        write_rows(json_out, rows)
        typer.echo(f"wrote {json_out}", err=True)
    if plot_out:
        typer.echo(f"wrote {plot(rows, plot_out)}", err=True)


@app.command("plan")
def plan_command(
    model: str = typer.Option("llama-2-7b", help="Bundled shape (llama-2-7b, llama-2-13b, llama-3-8b, mistral-7b, qwen2-7b, smollm2-135m), a config.json file or folder, or a hub id."),
    memory: str = typer.Option("80GiB", help="Memory budget, e.g. 80GiB, 24GB."),
    method: str = typer.Option("kvquant-2bit-1pct", help="Comma-separated methods; fp16 is always planned."),
    batch: int = typer.Option(1, help="Batch for the longest-context plan."),
    context: Optional[int] = typer.Option(None, help="Context for the largest-batch plan (default: the model's maximum)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="JSON file (default results/plan-MODEL-MEMORY.json)."),
) -> None:
    """Longest context and largest batch that fit in a memory budget, per method next to fp16 (weights, activations, cache)."""
    from kvpack.evaluate.results import write_rows
    from kvpack.evaluate.plan import PAPER_CLAIM, format_plan, load_shape, paper_comparison, parse_memory, plan, rows_as_dicts

    try:
        shape = load_shape(model)
        budget = parse_memory(memory)
        rows = plan(shape, budget, _split_methods(method), batch=batch, context=context)
    except KVPackError as exc:
        _fail(exc)
    claim = PAPER_CLAIM if shape.name == "llama-2-7b" and any(r.method.startswith("kvquant-2bit") for r in rows) else None
    typer.echo(format_plan(shape, budget, rows, claim))
    out = rows_as_dicts(shape, budget, rows)
    if claim:
        out.append({"paper_comparison": paper_comparison(rows)})
    path = json_out or Path("results") / f"plan-{shape.name.replace('/', '_')}-{memory}.json"
    write_rows(path, out)
    typer.echo(f"wrote {path}", err=True)


if __name__ == "__main__":
    app()
