"""Natural-language tasks for real pretrained instruct models: word problems, comparisons, sorting, and
questions over a short notes passage (the RAG case), each with a difficulty ladder.

The sandbox (`sandbox.py`) speaks the toy model's compact format ("add 478+365" -> "...#### 843"). A real
instruct model is asked the way people ask ("Mia has 47 stickers and buys 25 more. How many stickers does
she have now?") and answers in sentences. Targets here are what such a model should learn to write: a
short reasoning, then "The answer is N." (the form the `natural` and `auto` answer modes read).

Problems are the sandbox's :class:`~trainer.tasks.sandbox.Problem`, split into train and held-out by the
same hash of the prompt, drawn by the same seeded streams, and saved as the same JSONL, so a user's file
in this shape goes through every command the built-in families do. Families (`NATURAL_FAMILIES`):

- `word_add`, `word_sub`, `word_mul`, `word_two_step`: arithmetic word problems, bigger numbers and more
  steps up the ladder;
- `compare`: who is older (a name, a text answer), among more people and closer ages up the ladder;
- `sort_numbers`: a list sorted ascending (the answer is the list), longer lists up the ladder;
- `notes_one`, `notes_two`: a notes passage with distractors; one fact, or two facts combined by a sum.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from trainer.tasks.sandbox import SPLITS, Problem, rng_for, sample_in_split

NATURAL_LEVELS = (1, 2, 3, 4)

NAMES = (
    "Mia", "Omar", "Lena", "Ravi", "Sofia", "Kenji", "Amara", "Lucas", "Noor", "Diego", "Hana", "Tariq",
    "Elena", "Jonas", "Priya", "Mateo", "Aisha", "Felix", "Yara", "Tomas", "Ines", "Kofi", "Mei", "Arjun",
)  # fmt: skip
ITEMS = (
    "apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "cards", "shells", "coins",
    "buttons", "crayons", "tickets", "beads", "eggs", "oranges",
)  # fmt: skip
CONTAINERS = {"box": "boxes", "bag": "bags", "jar": "jars", "crate": "crates", "basket": "baskets", "tray": "trays"}
THINGS = ("badge number", "locker number", "room number", "table number", "bus number", "desk number")
PLACES = (
    "The library opens at 9.", "The printer on floor 2 is out of paper.", "Lunch is served in the east hall.",
    "The parking lot closes at 22.", "The wifi password changed on Monday.", "The fire drill is on Friday.",
    "The cafe sells tea and soup.", "The gym is closed for repairs.", "The elevator near the lobby is slow.",
    "The garden is watered every morning.", "The mail arrives after noon.", "The museum tour lasts an hour.",
)  # fmt: skip
ANSWER = "The answer is {}."

Generated = tuple[str, str, str]  # (prompt, target reply, answer)


def _digits(rng: random.Random, k: int) -> int:
    return rng.randint(10 ** (k - 1) if k > 1 else 1, 10**k - 1)


def _gen_word_add(rng: random.Random, level: int) -> Generated:
    da, db = {1: (2, 1), 2: (2, 2), 3: (3, 2), 4: (3, 3)}[level]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = _digits(rng, da), _digits(rng, db)
    prompt = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    target = f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}. " + ANSWER.format(a + b)
    return prompt, target, str(a + b)


def _gen_word_sub(rng: random.Random, level: int) -> Generated:
    da, db = {1: (2, 1), 2: (2, 2), 3: (3, 2), 4: (3, 3)}[level]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = sorted((_digits(rng, da), _digits(rng, db)), reverse=True)
    if a == b:
        a += 1
    prompt = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    target = f"{name} had {a} {item} and gave away {b}, so {a} - {b} = {a - b}. " + ANSWER.format(a - b)
    return prompt, target, str(a - b)


def _gen_word_mul(rng: random.Random, level: int) -> Generated:
    dk, dm = {1: (1, 1), 2: (1, 2), 3: (2, 2), 4: (2, 3)}[level]
    box, item = rng.choice(list(CONTAINERS)), rng.choice(ITEMS)
    k, m = max(2, _digits(rng, dk)), max(2, _digits(rng, dm))
    boxes = CONTAINERS[box]
    prompt = f"A {box} holds {m} {item}. How many {item} are in {k} {boxes}?"
    target = f"Each {box} holds {m} {item}, so {k} {boxes} hold {k} × {m} = {k * m}. " + ANSWER.format(k * m)
    return prompt, target, str(k * m)


def _gen_word_two_step(rng: random.Random, level: int) -> Generated:
    dk, dm = {1: (1, 1), 2: (1, 2), 3: (2, 1), 4: (2, 2)}[level]
    name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(list(CONTAINERS))
    k, m = max(2, _digits(rng, dk)), max(2, _digits(rng, dm))
    total = k * m
    eaten = rng.randint(2, total - 1)
    prompt = (
        f"{name} buys {k} {CONTAINERS[box]} with {m} {item} in each {box}, then gives {eaten} {item} to a friend. "
        f"How many {item} does {name} have left?"
    )
    target = (
        f"{name} buys {k} × {m} = {total} {item}. After giving away {eaten}, {total} - {eaten} = {total - eaten}. "
        + ANSWER.format(total - eaten)
    )
    return prompt, target, str(total - eaten)


def _gen_compare(rng: random.Random, level: int) -> Generated:
    people, spread = {1: (2, 30), 2: (3, 20), 3: (4, 10), 4: (5, 5)}[level]
    names = rng.sample(NAMES, people)
    base = rng.randint(20, 60)
    ages = rng.sample(range(base, base + spread + people), people)
    listed = ", ".join(f"{n} is {a}" for n, a in zip(names, ages))
    oldest = names[ages.index(max(ages))]
    prompt = f"{listed}. Who is {'older' if people == 2 else 'the oldest'}?"
    target = f"The oldest age is {max(ages)}, which is {oldest}'s. " + ANSWER.format(oldest)
    return prompt, target, oldest


def _gen_sort_numbers(rng: random.Random, level: int) -> Generated:
    count, top = {1: (3, 99), 2: (4, 99), 3: (5, 999), 4: (6, 999)}[level]
    values = rng.sample(range(1, top + 1), count)
    ordered = sorted(values)
    shown = ", ".join(map(str, ordered))
    prompt = f"Sort these numbers from smallest to largest: {', '.join(map(str, values))}."
    target = f"From smallest to largest: {shown}. " + ANSWER.format(shown)
    return prompt, target, " ".join(map(str, ordered))


def _notes(rng: random.Random, facts: list[str], distractors: int) -> str:
    lines = facts + rng.sample(PLACES, distractors)
    rng.shuffle(lines)
    return "Notes:\n" + "\n".join(f"- {line}" for line in lines)


def _gen_notes_one(rng: random.Random, level: int) -> Generated:
    distractors, people = {1: (2, 1), 2: (4, 2), 3: (6, 3), 4: (8, 4)}[level]
    names = rng.sample(NAMES, people)
    thing = rng.choice(THINGS)
    values = [rng.randint(100, 9999) for _ in names]
    facts = [f"{n}'s {thing} is {v}." for n, v in zip(names, values)]  # the other people's are distractors too
    asked = rng.randrange(people)
    passage = _notes(rng, facts, distractors)
    prompt = f"{passage}\n\nQuestion: What is {names[asked]}'s {thing}?"
    target = f"The notes say {names[asked]}'s {thing} is {values[asked]}. " + ANSWER.format(values[asked])
    return prompt, target, str(values[asked])


def _gen_notes_two(rng: random.Random, level: int) -> Generated:
    distractors, people = {1: (2, 2), 2: (4, 3), 3: (6, 4), 4: (8, 5)}[level]
    names = rng.sample(NAMES, people)
    item = rng.choice(ITEMS)
    counts = [rng.randint(2, 60) for _ in names]
    facts = [f"{n} has {c} {item}." for n, c in zip(names, counts)]
    i, j = rng.sample(range(people), 2)
    passage = _notes(rng, facts, distractors)
    total = counts[i] + counts[j]
    prompt = f"{passage}\n\nQuestion: How many {item} do {names[i]} and {names[j]} have together?"
    target = (
        f"{names[i]} has {counts[i]} and {names[j]} has {counts[j]}, so {counts[i]} + {counts[j]} = {total}. "
        + ANSWER.format(total)
    )
    return prompt, target, str(total)


@dataclass(frozen=True)
class Family:
    """A named natural-language problem family with a seeded generator per level."""

    name: str
    description: str
    _generate: Callable[[random.Random, int], Generated]

    def generate(self, rng: random.Random, level: int) -> Problem:
        if isinstance(level, bool) or level not in NATURAL_LEVELS:
            raise ValueError(f"level must be one of {list(NATURAL_LEVELS)}, got {level!r}")
        prompt, target, answer = self._generate(rng, level)
        return Problem(prompt=prompt, answer=answer, chain=target, domain=self.name, difficulty=level)


NATURAL_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("word_add", "word problems: one addition", _gen_word_add),
        Family("word_sub", "word problems: one subtraction", _gen_word_sub),
        Family("word_mul", "word problems: one multiplication", _gen_word_mul),
        Family("word_two_step", "word problems: a multiplication, then a subtraction", _gen_word_two_step),
        Family("compare", "who is the oldest (a name)", _gen_compare),
        Family("sort_numbers", "a list sorted ascending", _gen_sort_numbers),
        Family("notes_one", "one fact from a notes passage with distractors", _gen_notes_one),
        Family("notes_two", "two facts from a notes passage, added", _gen_notes_two),
    )
}


def get_family(name: str) -> Family:
    try:
        return NATURAL_FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown family {name!r}; natural families: {', '.join(NATURAL_FAMILIES)}") from None


def iter_natural(
    seed: int | str,
    split: str = "train",
    families: Sequence[str] | None = None,
    levels: Sequence[int] = NATURAL_LEVELS,
) -> Iterator[Problem]:
    """An endless, deterministic stream of one split, round-robin over families x levels (level-major)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    names = list(NATURAL_FAMILIES) if families is None else list(families)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"families must be distinct and at least one, got {names}")
    chosen = [get_family(n) for n in names]
    levels = list(levels)
    if not levels or len(set(levels)) != len(levels) or any(lv not in NATURAL_LEVELS for lv in levels):
        raise ValueError(f"levels must be distinct values of {list(NATURAL_LEVELS)}, got {levels}")
    cells = [(f, lv) for lv in levels for f in chosen]
    rng = rng_for("natural", seed, split, ",".join(names), ",".join(map(str, levels)))

    def stream() -> Iterator[Problem]:
        for family, level in itertools.cycle(cells):
            yield sample_in_split(family, rng, level, split)  # the sandbox's split by prompt hash

    return stream()


def natural_problems(
    n: int,
    seed: int | str,
    split: str = "train",
    families: Sequence[str] | None = None,
    levels: Sequence[int] = NATURAL_LEVELS,
) -> list[Problem]:
    """The first `n` problems of :func:`iter_natural` (balanced over families x levels)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return list(itertools.islice(iter_natural(seed, split, families, levels), n))
