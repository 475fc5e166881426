"""`kvpack generate`: continue a prompt file with the compressed cache; save / reload the prompt's cache."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from kvpack.cli.options import CalibData, CalibWindows, JsonOut, Model, Progress, PromptFile, Recalibrate, RecipeDir, fail, log
from kvpack.errors import KVPackError
from kvpack.generation import DEFAULT_METHOD, generate


def _prompt_text(prompt_file: Optional[Path], prompt: Optional[str]) -> Optional[str]:
    if prompt_file is not None and prompt is not None:
        raise KVPackError("Give the prompt once: --prompt-file FILE or --prompt TEXT, not both.")
    if prompt_file is None:
        return prompt
    try:
        return prompt_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KVPackError(f"Prompt file '{prompt_file}' does not exist.") from None
    except UnicodeDecodeError as exc:
        raise KVPackError(f"Prompt file '{prompt_file}' is not UTF-8 text ({exc}).") from None


def generate_command(
    model: Model = "smollm2-135m",
    method: Optional[str] = typer.Option(None, help=f"Method of the compressed cache (default {DEFAULT_METHOD}, or the one saved with --load-cache)."),
    recipe: RecipeDir = None,
    prompt_file: PromptFile = None,
    prompt: Optional[str] = typer.Option(None, help="Prompt text (instead of --prompt-file)."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template as a user turn (instruct models)."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate (stops earlier at the end-of-sequence token)."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="With --sample: softmax temperature."),
    seed: int = typer.Option(0, help="With --sample: random seed."),
    save_cache: Optional[Path] = typer.Option(None, help="Save the prompt's compressed cache (before generating) to this file."),
    load_cache: Optional[Path] = typer.Option(None, help="Continue from a cache saved with --save-cache; a prompt is appended after it."),
    json_out: JsonOut = None,
    calib_data: CalibData = "c4[:500]",
    calib_windows: CalibWindows = 16,
    recalibrate: Recalibrate = False,
    progress: Progress = True,
) -> None:
    """Continue a (long) prompt with the compressed cache, streaming the text; report the cache's memory at the end."""
    try:
        text = _prompt_text(prompt_file, prompt)
        result = generate(text, model=model, method=method, recipe=recipe, max_new_tokens=max_new_tokens, chat=chat,
                          sample=sample, temperature=temperature, seed=seed, save_cache=save_cache, load_cache=load_cache,
                          stream=True, calib_data=calib_data, calib_windows=calib_windows, recalibrate=recalibrate,
                          progress=progress, log=log)
    except KVPackError as exc:
        fail(exc)
    seconds = result.seconds
    log(f"\n{result.report}")
    log(f"decode attention: {result.attention}")
    log(f"{result.new_tokens} new tokens after {result.context_tokens} context tokens "
        f"({result.cached_tokens} from the saved cache); prefill {seconds.get('prefill', 0):.1f} s, "
        f"generate {seconds['generate']:.1f} s ({result.new_tokens / max(seconds['generate'], 1e-9):.1f} tokens/s), "
        f"peak memory {result.peak_rss_bytes / 2**20:.0f} MiB")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
        log(f"wrote {json_out}")
