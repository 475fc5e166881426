"""The `kvpack` command line: every command and the options the README uses; the demo on a tiny model."""
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_model, make_tiny_tokenizer
from kvpack.cli.app import app
from kvpack.evaluate.demo import end_at_sentence

OPTIONS = {
    "eval": ["--model", "--data", "--methods", "--seqlen", "--max-windows", "--json", "--calib-data", "--calib-windows",
             "--recipe", "--recalibrate", "--cache", "--chunk", "--resume", "--task", "--finetuned", "--progress"],
    "calibrate": ["--model", "--method", "--data", "--windows", "--seqlen", "--out", "--manifest"],
    "generate": ["--model", "--method", "--recipe", "--prompt-file", "--chat", "--max-new-tokens", "--sample",
                 "--temperature", "--save-cache", "--load-cache", "--json", "--calib-data", "--recalibrate"],
    "demo": ["--model", "--method", "--data", "--prompt-file", "--prompt-tokens", "--new-tokens", "--calib-windows"],
    "bench": ["--model", "--device", "--contexts", "--methods", "--json", "--plot", "--recipe"],
    "plan": ["--model", "--memory", "--method", "--json"],
    "report": ["--results", "--readme", "--docs", "--figure", "--check"],
    "finetune": ["--model", "--recipe", "--out", "--steps", "--data"],
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_command_has_its_options(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    missing = [o for o in OPTIONS[command] if o not in result.output]
    assert not missing, f"kvpack {command} lacks {missing}"


def test_demo_runs_on_the_shipped_text(monkeypatch):
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    monkeypatch.setattr(sys.modules["kvpack.evaluate.demo"], "load_model", lambda spec: (model, tok))
    result = CliRunner().invoke(app, ["demo", "--model", "tiny", "--method", "int4", "--prompt-tokens", "64", "--new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "kvpack's own text kv-cache-guide.txt, first 64 tokens" in result.output
    assert "greedy-token agreement with fp16" in result.output
    assert "along the fp16 continuation: same next token" in result.output


def test_demo_prompt_ends_at_a_sentence():
    class Words:
        def decode(self, ids):
            return "".join(["alpha", " beta.", " gamma", "\n", " delta", " eps"][int(i)] for i in ids)

    assert end_at_sentence(Words(), torch.arange(6)).tolist() == [0, 1, 2, 3]
    assert end_at_sentence(Words(), torch.arange(3)).tolist() == [0, 1]
    assert end_at_sentence(Words(), torch.tensor([0, 2, 4, 5])).tolist() == [0, 2, 4, 5]


def test_info_names_cpu_instruction_set_and_kernels():
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {"cpu", "instruction_set", "compiler", "cpu_kernels", "triton_kernels", "torch", "transformers"} <= set(info)
