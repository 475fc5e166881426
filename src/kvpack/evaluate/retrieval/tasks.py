"""RULER-style retrieval tasks, generated from a seed as token ids of an exact length.

A prompt is head + body + tail, in the tokenizer's chat format when it has one:
  head  the chat template up to the user's text, then the task's instruction;
  body  haystack runs (sentences of natural text, or key-value lines) with the task's needles
        inserted between runs, the target needle nearest to `depth` of the body (0 = first, 1 = last);
  tail  the question, the template's end of the user turn and start of the answer, and an answer
        prefix ("The special magic number for apple ... is"), so the first generated tokens are the answer.
The body gets exactly the tokens the head, tail and needles leave, so `len(trial.ids) == length`.

Tasks (answers are 7-digit numbers unless said):
  single_needle  one needle "The special magic number for KEY is: N." in natural text;
  multikey       the same with 3 distractor needles (other keys, other numbers); retrieve the one asked for;
  multiquery     2 asked keys among 2 distractors; retrieve both numbers;
  kv_lookup      the whole body is "word-word: N" lines; retrieve the number of one key;
  vartrack       a chain VAR A = 12345 ... VAR B = VAR A (one hop by default) in natural text; name every variable
                 that holds the value (answers are 5-letter names; the answer prefix ends in "VAR" so a small
                 model answers with names).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

from kvpack.evaluate.retrieval.text import WORDS, Haystack

NUMBER = r"\d{3,}"  # answer numbers; list markers ("1.", "2.") are not answers
INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n")


@dataclass
class Trial:
    """One prompt and its answer: `ids` has exactly `length` tokens; `expected` holds the answer units
    (numbers or names); `mode` 'first' scores the first unit generated, 'all' the first len(expected) as a set."""

    task: str
    length: int
    depth: float
    index: int
    ids: list[int]
    expected: list[str]
    mode: str
    position: float
    new_tokens: int
    unit: str = NUMBER
    meta: dict = field(default_factory=dict)


@dataclass
class Spec:
    """What a task builder returns: the texts around the body, the needles (text, depth; the first is the target)
    and the body filler (None = natural-text haystack)."""

    instruction: str
    question: str
    answer_prefix: str
    needles: list[tuple[str, float]]
    expected: list[str]
    mode: str
    new_tokens: int
    unit: str = NUMBER
    filler: Callable[[int, random.Random], list[list[int]]] | None = None


def chat_wrap(tokenizer) -> tuple[str, str]:
    """(before, after): the chat template's text before and after one user message, ending where the
    assistant's answer starts; ('', '\\n') for a tokenizer without a chat template."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        marker = "\x00USER\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = text.split(marker)
        return before, after
    return "", "\n"


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _distinct_numbers(rng: random.Random, count: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = _number(rng, digits)
        if value not in out:
            out.append(value)
    return out


def _magic(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}."


def single_needle(rng: random.Random, depth: float, tokenizer) -> Spec:
    key, (value,) = rng.choice(WORDS), _distinct_numbers(rng, 1)
    return Spec(INSTRUCTION, f"What is the special magic number for {key} mentioned in the provided text?",
                f"The special magic number for {key} mentioned in the provided text is",
                [(_magic(key, value), depth)], [value], "first", 12)


def multikey(rng: random.Random, depth: float, tokenizer, distractors: int = 3) -> Spec:
    keys, values = rng.sample(WORDS, 1 + distractors), _distinct_numbers(rng, 1 + distractors)
    needles = [(_magic(keys[0], values[0]), depth)] + [(_magic(k, v), rng.random()) for k, v in zip(keys[1:], values[1:])]
    return Spec(INSTRUCTION, f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                f"The special magic number for {keys[0]} mentioned in the provided text is",
                needles, [values[0]], "first", 12)


def multiquery(rng: random.Random, depth: float, tokenizer, asked: int = 2, distractors: int = 2) -> Spec:
    keys, values = rng.sample(WORDS, asked + distractors), _distinct_numbers(rng, asked + distractors)
    needles = [(_magic(keys[0], values[0]), depth)] + [(_magic(k, v), rng.random()) for k, v in zip(keys[1:], values[1:])]
    names = " and ".join(keys[:asked]) if asked <= 2 else ", ".join(keys[:asked - 1]) + " and " + keys[asked - 1]
    return Spec(INSTRUCTION, f"What are the special magic numbers for {names} mentioned in the provided text?",
                f"The special magic numbers for {names} mentioned in the provided text are",
                needles, values[:asked], "all", 12 * asked)


def kv_lookup(rng: random.Random, depth: float, tokenizer) -> Spec:
    first, second = rng.sample(WORDS, 2)
    key, value = f"{first}-{second}", _number(rng)

    def filler(room: int, fill_rng: random.Random) -> list[list[int]]:
        runs, used, seen = [], 0, {key}
        while used < room:
            pair = "-".join(fill_rng.sample(WORDS, 2))
            if pair in seen:
                continue
            seen.add(pair)
            ids = list(tokenizer(f"\n{pair}: {_number(fill_rng)}", add_special_tokens=False)["input_ids"])[: room - used]
            runs.append(ids)
            used += len(ids)
        return runs

    instruction = ("Below is a list of keys, each followed by its special magic number. Memorize the list. "
                   "I will ask you for the number of one key.\n")
    return Spec(instruction, f"\nWhat is the special magic number for {key} in the list above?",
                f"The special magic number for {key} is", [(f"\n{key}: {value}", depth)], [value], "first", 12,
                filler=filler)


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def vartrack(rng: random.Random, depth: float, tokenizer, hops: int = 1) -> Spec:
    names: list[str] = []
    while len(names) < hops + 1:
        name = _name(rng)
        if name not in names and name != "VAR":
            names.append(name)
    value = _number(rng, 5)
    later = sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops))
    needles = [(f"VAR {names[0]} = {value}.", depth)] + [(f"VAR {b} = VAR {a}.", d) for a, b, d in zip(names, names[1:], later)]
    instruction = ("Memorize and track the chain of variable assignments hidden in the following text.\n")
    return Spec(instruction, f"Find all variables that are assigned the value {value} in the text above.",
                f"According to the chain of variable assignments in the text above, {hops + 1} variables are "
                f"assigned the value {value}, they are: VAR", needles, names, "all", 8 * (hops + 1) + 4, unit=r"\b[A-Z]{5}\b")


TASKS: dict[str, Callable[..., Spec]] = {"single_needle": single_needle, "multikey": multikey,
                                          "multiquery": multiquery, "kv_lookup": kv_lookup, "vartrack": vartrack}


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def trial_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """The generator of one trial: the same (seed, task, length, index) gives the same trial on every run."""
    return random.Random(f"{seed}:{task}:{length}:{index}")


def make_trial(tokenizer, haystack: Haystack, task: str, length: int, index: int, depths: list[float],
               seed: int = 0) -> Trial:
    """Trial `index` of `task` at `length` tokens; its target depth is depths[index % len(depths)]."""
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task '{task}' ({' | '.join(TASKS)})")
    rng = trial_rng(seed, task, length, index)
    depth = float(depths[index % len(depths)])
    spec = TASKS[task](rng, depth, tokenizer)
    before, after = chat_wrap(tokenizer)
    bos = [tokenizer.bos_token_id] if not before and getattr(tokenizer, "bos_token_id", None) is not None else []
    head = bos + _ids(tokenizer, before + spec.instruction)
    tail = _ids(tokenizer, "\n" + spec.question + after + spec.answer_prefix)
    needles = [(_ids(tokenizer, (" " if not text.startswith("\n") else "") + text), d) for text, d in spec.needles]
    room = length - len(head) - len(tail) - sum(len(n) for n, _ in needles)
    if room < 0:
        raise ValueError(f"{task}: {length} tokens cannot hold the prompt ({length - room} tokens without haystack)")
    runs = spec.filler(room, rng) if spec.filler else haystack.fill(room, rng)
    offsets = [0]
    for run in runs:
        offsets.append(offsets[-1] + len(run))
    # each needle goes to the run boundary nearest its depth; needles sharing a boundary keep their order
    placed = sorted(((min(range(len(offsets)), key=lambda b: abs(offsets[b] - d * room)), i) for i, (_, d) in enumerate(needles)))
    body: list[int] = []
    starts: dict[int, int] = {}
    cursor = 0
    for boundary, i in placed:
        while cursor < boundary:
            body += runs[cursor]
            cursor += 1
        starts[i] = len(head) + len(body)
        body += needles[i][0]
    for run in runs[cursor:]:
        body += run
    ids = head + body + tail
    assert len(ids) == length, (task, len(ids), length)
    return Trial(task, length, depth, index, ids, spec.expected, spec.mode, starts[0] / length, spec.new_tokens,
                 spec.unit, meta={"needle_starts": [starts[i] for i in range(len(needles))]})
