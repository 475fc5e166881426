"""`kvpack model-path NAME`: print the local folder of a model kvpack knows (for `vllm serve`, `LLM(model=...)`)."""
from __future__ import annotations

import typer

from kvpack.cli.options import fail
from kvpack.errors import KVPackError
from kvpack.hf.models import DEFAULT_MODEL, model_path


def model_path_command(
    name: str = typer.Argument(DEFAULT_MODEL, help="A short name (smollm2-135m), a .gguf file or a local model folder."),
) -> None:
    """Print the local folder (config, safetensors, tokenizer) of NAME; the embedded default model is converted
    from its GGUF on first use, so `LLM(model=$(kvpack model-path smollm2-135m))` works offline."""
    try:
        typer.echo(str(model_path(name)))
    except KVPackError as exc:
        fail(exc)
