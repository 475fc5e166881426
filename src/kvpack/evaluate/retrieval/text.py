"""Haystack text for the retrieval tasks: sentences of natural text, and the words keys are made of.

The haystack is real prose (C4 documents held out from calibration by default, WikiText-2, the
KV-cache guide shipped with kvpack, or any file), split into sentences; a trial takes consecutive
sentences from a seeded starting point, so every trial reads different text.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path

from kvpack.data import load_corpus
from kvpack.errors import DataError

GUIDE = Path(__file__).resolve().parents[2] / "texts" / "kv-cache-guide.txt"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")

# Common, single-token-ish English nouns; keys are one word (needles) or two words (key-value pairs).
WORDS = """apple river candle mirror garden window rocket pencil violin forest bridge ladder castle dragon
island jacket kettle lemon marble needle orange pepper puzzle rabbit saddle tiger tunnel wagon zebra anchor
basket button cactus camera carpet cherry cookie copper cotton crayon dolphin eagle engine falcon feather
finger flower gravel guitar hammer helmet honey insect jungle kitten lantern lizard magnet meadow monkey
napkin ocean onion oyster palace parrot peanut pillow planet pocket potato pumpkin quilt radio ribbon saucer
shovel silver spider spoon statue summer sunset tomato trumpet turtle velvet walnut whistle winter wizard
yogurt badger banjo beetle blanket bottle bucket butter canyon carrot cellar circus clover coffee comet
desert donkey drum ember fabric fiddle fossil galaxy ginger glacier goblin harbor hazel iris ivory jasmine
kayak koala ledger lilac lobster maple melon mitten nectar nickel nutmeg olive orchid otter panda pearl
pebble pelican piano pickle pirate plum prism quartz raven reef saffron salmon sapphire scarf sparrow
squirrel tablet thimble thunder tulip umbrella valley vessel walrus willow""".split()


def _sentences(text: str) -> list[str]:
    """Sentences of `text` (paragraph breaks and runs of spaces become one space), 3 to 80 words each."""
    flat = re.sub(r"\s+", " ", text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")).strip()
    return [s for s in _SENTENCE.split(flat) if 3 <= len(s.split()) <= 80]


@lru_cache(maxsize=4)
def load_sentences(spec: str) -> tuple[str, ...]:
    """Sentences of the haystack named by `spec`: 'guide' (shipped with kvpack), a data spec ('c4[500:]',
    'wikitext2', see kvpack.data) or a path."""
    if spec == "guide":
        text = GUIDE.read_text(encoding="utf-8")
    else:
        text = load_corpus(spec).text
    sentences = _sentences(text)
    if len(sentences) < 8:
        raise DataError(f"haystack '{spec}' holds {len(sentences)} usable sentences; need at least 8")
    return tuple(sentences)


class Haystack:
    """Token runs of consecutive sentences, tokenized once each (a run is one sentence with a leading space)."""

    def __init__(self, tokenizer, spec: str = "c4[500:]"):
        self.tokenizer, self.spec = tokenizer, spec
        self.sentences = load_sentences(spec)
        self._ids: dict[int, list[int]] = {}

    def sentence_ids(self, index: int) -> list[int]:
        index %= len(self.sentences)
        if index not in self._ids:
            self._ids[index] = list(self.tokenizer(" " + self.sentences[index], add_special_tokens=False)["input_ids"])
        return self._ids[index]

    def fill(self, room: int, rng: random.Random) -> list[list[int]]:
        """Runs of token ids, one per sentence from a random start, `room` tokens in all; the first run is cut
        from its start to fit, so every boundary after it ends a whole sentence."""
        runs, used, index = [], 0, rng.randrange(len(self.sentences))
        while used < room:
            ids = self.sentence_ids(index)
            runs.append(ids)
            used += len(ids)
            index += 1
        excess = used - room
        while runs and excess >= len(runs[0]):
            excess -= len(runs.pop(0))
        if runs:
            runs[0] = runs[0][excess:]
        return runs
