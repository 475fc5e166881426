"""Retrieval suite: exact-length prompts, seeded generation, exact-match scoring, Wilson intervals, resumable runs
through the real cache on a tiny random model (whose answers are noise: accuracy itself is not checked)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from kvpack.evaluate import retrieval
from kvpack.evaluate.retrieval import run as run_module
from kvpack.evaluate.retrieval.score import exact_match, units, wilson
from kvpack.evaluate.retrieval.tasks import TASKS, chat_wrap, make_trial
from kvpack.evaluate.retrieval.text import Haystack

pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    """One id per character: printable ASCII -> 3..97, newline -> 98, anything else -> 99; decode inverts it."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) - 32 if 32 <= ord(c) < 127 else 98 if c == "\n" else 99 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 3 + 32) if 3 <= i < 98 else "\n" if i == 98 else "?" for i in ids if i >= 3)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def hay(tok):
    return Haystack(tok, "guide")


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [700, 1013, 2048])
def test_every_prompt_has_the_exact_length_and_its_needles_once(tok, hay, task, length):
    for index in range(3):
        trial = make_trial(tok, hay, task, length, index, [0.0, 0.5, 1.0], seed=3)
        assert len(trial.ids) == length and trial.ids[0] == tok.bos_token_id
        text = tok.decode(trial.ids)
        assert all(text.count(value) >= 1 for value in trial.expected)
        assert trial.depth == [0.0, 0.5, 1.0][index % 3] and 0.0 < trial.position < 1.0


def test_target_follows_its_depth(tok, hay):
    trials = [make_trial(tok, hay, "single_needle", 1500, 0, [d], seed=1) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    positions = [t.position for t in trials]
    assert positions == sorted(positions) and len(set(positions)) == 5
    needle = tok(" The special magic number for")["input_ids"]
    for trial in trials:
        start = trial.meta["needle_starts"][0]
        assert trial.ids[start:start + len(needle)] == needle
    first, last = trials[0], trials[-1]
    assert tok.decode(first.ids[:first.meta["needle_starts"][0]]).endswith("afterwards.\n")  # right after the instruction
    after = tok.decode(last.ids[last.meta["needle_starts"][0]:])
    assert after.split(".", 1)[1].startswith("\nWhat is the special magic number")  # right before the question


def test_variable_chain_is_in_order(tok, hay):
    from kvpack.evaluate.retrieval.tasks import vartrack

    trial = make_trial(tok, hay, "vartrack", 1500, 0, [0.3], seed=2)
    text = tok.decode(trial.ids)
    first, second = trial.expected
    assert text.index(f"VAR {first} =") < text.index(f"VAR {second} = VAR {first}")
    names = vartrack(__import__("random").Random(0), 0.0, tok, hops=3).expected
    assert len(names) == 4 and len(set(names)) == 4
    assert trial.mode == "all" and trial.unit != r"\d+"


def test_distractors_have_other_keys_and_numbers(tok, hay):
    trial = make_trial(tok, hay, "multikey", 1500, 4, [0.5], seed=0)
    text = tok.decode(trial.ids)
    assert text.count("The special magic number for") == 4 + 1  # three distractors, the target, and the question
    numbers = [u for u in units(text) if len(u) == 7]
    assert len(set(numbers)) == 4 and trial.expected[0] in numbers


def test_kv_lookup_keys_are_unique(tok, hay):
    trial = make_trial(tok, hay, "kv_lookup", 2048, 0, [0.5], seed=0)
    lines = [line.split(":")[0] for line in tok.decode(trial.ids).split("\n") if ": " in line and "-" in line]
    assert len(lines) > 20 and len(set(lines[1:-1])) == len(lines[1:-1])


def test_seeds_reproduce(tok, hay):
    a = make_trial(tok, hay, "multiquery", 900, 5, [0.0, 1.0], seed=7)
    b = make_trial(tok, Haystack(tok, "guide"), "multiquery", 900, 5, [0.0, 1.0], seed=7)
    c = make_trial(tok, hay, "multiquery", 900, 5, [0.0, 1.0], seed=8)
    assert a.ids == b.ids and a.expected == b.expected
    assert a.ids != c.ids


def test_too_short_is_refused(tok, hay):
    with pytest.raises(ValueError, match="cannot hold"):
        make_trial(tok, hay, "multiquery", 200, 0, [0.5])
    with pytest.raises(ValueError, match="unknown retrieval task"):
        make_trial(tok, hay, "nope", 900, 0, [0.5])


def test_chat_template_wraps_the_user_turn():
    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return f"<u>{messages[0]['content']}</u><a>"

    assert chat_wrap(Chat()) == ("<u>", "</u><a>")
    assert chat_wrap(CharTokenizer()) == ("", "\n")


def test_exact_match():
    assert exact_match(" 1234567.", ["1234567"])
    assert not exact_match(" 123456.", ["1234567"])            # partial number
    assert not exact_match(" 12345678", ["1234567"])           # longer number
    assert not exact_match(" 7654321 or 1234567", ["1234567"])  # the first number counts
    assert not exact_match(" none", ["1234567"])
    assert exact_match(" 2222222 and 1111111. Also 3", ["1111111", "2222222"], "all")
    assert not exact_match(" 1111111 and 3333333, 2222222", ["1111111", "2222222"], "all")
    assert not exact_match(" 1111111.", ["1111111", "2222222"], "all")
    assert exact_match(":\n1. 1111111\n2. 2222222", ["1111111", "2222222"], "all")  # list markers are not answers
    assert exact_match(" ABCDE, FGHIJ, KLMNO", ["KLMNO", "ABCDE", "FGHIJ"], "all", r"\b[A-Z]{5}\b")
    assert not exact_match(" ABCDE, FGHIJ", ["KLMNO", "ABCDE", "FGHIJ"], "all", r"\b[A-Z]{5}\b")


def test_wilson_interval():
    # reference values: statsmodels proportion_confint(method="wilson")
    for (hits, n), (low, high) in {(5, 10): (0.236593, 0.763407), (0, 10): (0.0, 0.277533),
                                   (10, 10): (0.722467, 1.0), (27, 30): (0.743791, 0.965396)}.items():
        got = wilson(hits, n)
        assert got[0] == pytest.approx(low, abs=1e-5) and got[1] == pytest.approx(high, abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)
    half = [(wilson(70, 140)[1] - wilson(70, 140)[0]) / 2, (wilson(126, 140)[1] - wilson(126, 140)[0]) / 2]
    assert half[0] > 0.08 and half[1] < 0.051  # 140 trials: +-5 points near 90%, not near 50%


def test_runs_through_the_real_cache_and_resumes(tok, tmp_path, monkeypatch):
    from test_attention import nuq_recipe

    model = make_tiny_model("llama", vocab_size=128)
    recipes = {"fp16": None, "kvquant": nuq_recipe(model, 4, 0.01)}
    path = tmp_path / "r.json"
    save = lambda rows: retrieval.run.write_rows(path, rows)  # noqa: E731
    rows = retrieval.run_retrieval(model, tok, recipes, ["single_needle", "vartrack"], [400], [0.0, 1.0], trials=2,
                                   haystack="guide", model_name="tiny", save=save)
    assert len(rows) == 4 and {r["method"] for r in rows} == {"fp16", "kvquant"}
    assert all(r["trials"] == 2 and [x["index"] for x in r["results"]] == [0, 1] for r in rows)
    assert all(r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in rows)
    assert json.loads(path.read_text()) == rows

    calls = []
    real = run_module.answer
    monkeypatch.setattr(run_module, "answer", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    more = retrieval.run_retrieval(model, tok, recipes, ["single_needle", "vartrack"], [400], [0.0, 1.0], trials=3,
                                   haystack="guide", model_name="tiny", rows=json.loads(path.read_text()), save=save)
    assert len(calls) == 4  # one new trial per cell, nothing rerun
    assert all(r["trials"] == 3 for r in more)
    first = {(r["task"], r["method"]): r["results"][:2] for r in rows}
    assert all(r["results"][:2] == first[(r["task"], r["method"])] for r in more)
    # the same trial is the same prompt for every method
    assert [x["expected"] for x in more[0]["results"]] == [x["expected"] for x in more[1]["results"]]

    assert "Wilson" in retrieval.table(more)
    assert {"task", "length", "fp16", "kvquant"} <= set(retrieval.pivot(more)[0])
    assert retrieval.heatmap(more, tmp_path / "r.png").stat().st_size > 1000


def test_minutes_stop_between_trial_indices(tok, monkeypatch):
    monkeypatch.setattr(run_module, "answer", lambda *a, **k: " 1234567.")
    rows = retrieval.run_retrieval(None, tok, {"fp16": None, "other": object()}, ["single_needle", "multikey"], [900],
                                   [0.5], trials=5, haystack="guide", minutes=1e-9)
    assert len(rows) == 4 and all(r["trials"] == 1 for r in rows)  # the first index in every cell, then stop


def test_other_depths_or_seeds_are_other_cells(tok, monkeypatch):
    monkeypatch.setattr(run_module, "answer", lambda *a, **k: " 1234567.")
    rows = retrieval.run_retrieval(None, tok, {"fp16": None}, ["single_needle"], [900], [0.0], trials=1, haystack="guide")
    rows = retrieval.run_retrieval(None, tok, {"fp16": None}, ["single_needle"], [900], [1.0], trials=1, haystack="guide", rows=rows)
    rows = retrieval.run_retrieval(None, tok, {"fp16": None}, ["single_needle"], [900], [1.0], trials=1, haystack="guide",
                                   rows=rows, seed=1)
    assert [(r["depths"], r["seed"], r["trials"]) for r in rows] == [([0.0], 0, 1), ([1.0], 0, 1), ([1.0], 1, 1)]


def test_correct_answers_score_one(tok, monkeypatch):
    """A method that answers with the expected units scores 1.0; one that answers a distractor scores 0."""
    hay = Haystack(tok, "guide")
    trials = {}

    def fake_answer(model, tokenizer, ids, recipe, new_tokens, **kwargs):
        trial = trials[tuple(ids[0].tolist())]
        return " " + ", ".join(trial.expected) + "." if recipe is None else " 1000000."

    real_make = run_module.make_trial

    def remember(*args, **kwargs):
        trial = real_make(*args, **kwargs)
        trials[tuple(trial.ids)] = trial
        return trial

    monkeypatch.setattr(run_module, "answer", fake_answer)
    monkeypatch.setattr(run_module, "make_trial", remember)
    rows = retrieval.run_retrieval(None, tok, {"fp16": None, "wrong": object()}, list(TASKS), [900], [0.5], trials=2,
                                   haystack="guide")
    assert {r["method"]: r["accuracy"] for r in rows if r["method"] == "fp16"} == {"fp16": 1.0}
    assert all(r["accuracy"] == 0.0 for r in rows if r["method"] == "wrong")


def test_lost_counts_the_baseline_trials_a_method_misses():
    def cell(method, correct):
        row = {"task": "t", "length": 10, "method": method, "results": [{"index": i, "depth": 0.0, "correct": c}
                                                                        for i, c in enumerate(correct)]}
        return retrieval.run.summarize(row)

    rows = [cell("fp16", [True, True, False, True]), cell("m", [True, False, True, False])]
    line = retrieval.pivot(rows)[0]
    assert line["fp16"] == "0.75 (0.30-0.95)" and line["m"].endswith(", lost 2/3") and line["trials"] == "4/4"
    assert line["seconds"] == "-/-"
    rows[0]["seconds"] = 10.0
    assert retrieval.pivot(rows)[0]["seconds"] == "2/-"  # 10 s over 4 answers


def test_cli_task_retrieval(tok, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvpack.cli.app import app

    model = make_tiny_model("llama", vocab_size=128)
    monkeypatch.setattr(run_module, "load_model", lambda spec: (model, tok))
    out = tmp_path / "retrieval-tiny.json"
    args = ["eval", "--task", "retrieval", "--model", "tiny", "--methods", "int4", "--tasks", "single_needle",
            "--lengths", "450", "--depths", "0,1", "--trials", "1", "--haystack", "guide", "--json", str(out),
            "--plot", str(tmp_path / "r.png"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["method"], r["trials"]) for r in rows] == [("fp16", 1), ("int4", 1)]
    assert json.loads((tmp_path / "retrieval-tiny-table.json").read_text())[0]["task"] == "single_needle"
    result = CliRunner().invoke(app, args[:-9] + ["--trials", "2"] + args[-7:])
    assert result.exit_code == 0, result.output
    assert [r["trials"] for r in json.loads(out.read_text())] == [2, 2]


def test_complete_units_need_something_after_them():
    from kvpack.evaluate.retrieval.answer import complete_units

    assert complete_units(" 1234567", r"\d{3,}") == 0  # the next token could add a digit
    assert complete_units(" 1234567.", r"\d{3,}") == 1
    assert complete_units(" 12. 345", r"\d{3,}") == 0  # "12" is no answer unit
    assert complete_units(" ABCDE, FGHIJ", r"\b[A-Z]{5}\b") == 1 and complete_units(" ABCDE, FGHIJ ", r"\b[A-Z]{5}\b") == 2


def test_answer_stops_once_the_units_are_complete(tok):
    """The early stop cuts the same greedy continuation short, right after the units it waits for."""
    from kvpack.evaluate.retrieval.answer import answer

    model = make_tiny_model("llama", vocab_size=128)
    ids = torch.tensor([tok("The special magic number is")["input_ids"]])
    full = answer(model, tok, ids, None, 12)
    short = answer(model, tok, ids, None, 12, units=2, pattern=r"[\s\S]")  # any character is a unit here
    assert len(full) > 3 and short == full[:3]
