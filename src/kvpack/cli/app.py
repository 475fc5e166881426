"""The `kvpack` Typer app: the global --threads option and one command per module of `kvpack.cli`."""
from __future__ import annotations

from typing import Optional

import torch
import typer

from kvpack.cli.bench import bench_command
from kvpack.cli.calibrate import calibrate_command
from kvpack.cli.demo import demo_command
from kvpack.cli.eval import eval_command
from kvpack.cli.finetune import finetune_command
from kvpack.cli.generate import generate_command
from kvpack.cli.info import info_command
from kvpack.cli.plan import plan_command
from kvpack.cli.model_path import model_path_command
from kvpack.cli.report import report_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress the KV cache of transformer LMs and measure it.")


@app.callback()
def main(
    threads: Optional[int] = typer.Option(None, envvar="KVPACK_THREADS", help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Compress the KV cache of transformer LMs and measure it."""
    if threads:
        torch.set_num_threads(threads)


COMMANDS = {
    "generate": generate_command,
    "eval": eval_command,
    "calibrate": calibrate_command,
    "finetune": finetune_command,
    "report": report_command,
    "demo": demo_command,
    "bench": bench_command,
    "plan": plan_command,
    "info": info_command,
    "model-path": model_path_command,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


if __name__ == "__main__":
    app()
