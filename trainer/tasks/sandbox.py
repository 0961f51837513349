"""Seeded, verifiable, multi-domain reasoning problems for a tiny character-level model.

Every sandbox problem comes with a compact worked chain (every character is a
token) that ends with ``"\\n#### <answer>"``. Problems are split into "train" and
"heldout" by a hash of the prompt, so the two splits never share a prompt.
User datasets are read from / written to JSONL with :func:`load_jsonl` / :func:`save_jsonl`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import string
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ensemble_serve.shared.voting.answers import AnswerSpec, answers_equal, extract_answer, normalize_answer

SPLITS = ("train", "heldout")
LEVELS = tuple(range(1, 9))  # every family's difficulty ladder: more digits, steps, items, keys as the level grows
DIFFICULTIES = (1, 2, 3, 4)  # the default levels of a problem stream (the first substrate's range)
MAX_TRIES = 10_000  # rejection-sampling budget for one problem

VerdictStatus = Literal["correct", "wrong", "missing", "malformed", "unlabelled"]


# ---------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem: the user message, its canonical answer and (optionally) a worked chain."""

    prompt: str
    answer: str | None  # normalize_answer form; None = unlabelled
    chain: str | None  # worked chain ending with "\n#### <answer>"; None if the data has none
    domain: str
    difficulty: int  # a level of LEVELS for the sandbox, 0 = unknown (user data)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("'prompt' must be a non-empty string")
        if self.answer is not None and not isinstance(self.answer, str):
            raise ValueError(f"'answer' must be a string or None, got {type(self.answer).__name__}")
        if self.chain is not None and not isinstance(self.chain, str):
            raise ValueError(f"'chain' must be a string or None, got {type(self.chain).__name__}")
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError("'domain' must be a non-empty string")
        if (
            isinstance(self.difficulty, bool)
            or not isinstance(self.difficulty, int)
            or not 0 <= self.difficulty <= LEVELS[-1]
        ):
            raise ValueError(f"'difficulty' must be an integer in 0..{LEVELS[-1]}, got {self.difficulty!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "chain": self.chain,
            "domain": self.domain,
            "difficulty": self.difficulty,
        }

    @classmethod
    def from_json(cls, d: Any) -> Problem:
        """Build a problem from a JSON object; ValueError says which field is wrong."""
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a JSON object, got {_json_type(d)}")
        if "prompt" not in d:
            raise ValueError("missing required field 'prompt'")
        prompt = d["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {_json_type(prompt)}")
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
        answer = d.get("answer")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise ValueError(f"'answer' must be a string or a number, got {_json_type(answer)}")
            answer = normalize_answer(answer)
            if not answer:
                raise ValueError("'answer' is empty")
        domain = d.get("domain")
        if domain is None:
            domain = "user"
        if not isinstance(domain, str) or not domain:
            raise ValueError(f"'domain' must be a non-empty string, got {_json_type(domain)}")
        chain = d.get("chain")
        if chain is not None and not isinstance(chain, str):
            raise ValueError(f"'chain' must be a string, got {_json_type(chain)}")
        difficulty = d.get("difficulty", 0)
        if isinstance(difficulty, bool) or not isinstance(difficulty, int) or not 0 <= difficulty <= 4:
            raise ValueError(f"'difficulty' must be an integer in 0..4, got {difficulty!r}")
        return cls(prompt=prompt, answer=answer, chain=chain, domain=domain, difficulty=difficulty)


def _json_type(v: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class Verdict:
    """Whether a model output answers a problem correctly."""

    correct: bool
    predicted: str | None
    status: VerdictStatus


def verify(problem: Problem, text: str, spec: AnswerSpec = "auto") -> Verdict:
    """Check `text` against `problem.answer` (numbers compared exactly).

    With the default "auto" spec a '#### ' line wins; a text with only stray numbers and
    no marker (nor 'answer is X') is "missing".
    """
    extraction = extract_answer(text, spec)
    if problem.answer is None:
        return Verdict(False, extraction.value, "unlabelled")
    if extraction.status != "ok":
        return Verdict(False, None, extraction.status)
    correct = answers_equal(extraction.value, problem.answer)
    return Verdict(correct, extraction.value, "correct" if correct else "wrong")


# ---------------------------------------------------------------------------
# Domains: each generator returns (prompt, chain steps, answer)
# ---------------------------------------------------------------------------

Generated = tuple[str, list[str], str]


def _rand_digits(rng: random.Random, k: int) -> int:
    """A number with exactly k digits (k == 1 includes 0)."""
    return rng.randint(0 if k == 1 else 10 ** (k - 1), 10**k - 1)


def _columns(n: int, width: int) -> list[int]:
    """The digits of n, least significant first, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def _gen_add(rng: random.Random, d: int) -> Generated:
    a = _rand_digits(rng, d + 1)
    b = _rand_digits(rng, rng.randint(1, d + 1))
    steps, carry = [], 0
    for x, y in zip(_columns(a, d + 1), _columns(b, d + 1)):
        s = x + y + carry
        steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return f"add {a}+{b}", steps, str(a + b)


def _gen_sub(rng: random.Random, d: int) -> Generated:
    a = _rand_digits(rng, d + 1)
    k = rng.randint(1, d + 1)
    b = rng.randint(0 if k == 1 else 10 ** (k - 1), min(10**k - 1, a))
    steps, borrow = [], 0
    for x, y in zip(_columns(a, d + 1), _columns(b, d + 1)):
        r = x - y - borrow
        lhs = f"{x}-{y}-1" if borrow else f"{x}-{y}"
        borrow = int(r < 0)
        steps.append(f"{lhs}+10={r + 10}" if borrow else f"{lhs}={r}")
    return f"sub {a}-{b}", steps, str(a - b)


def _eval_flat(values: list[int], ops: list[str], steps: list[str]) -> int | None:
    """Evaluate a parenthesis-free expression ('*' first, then left to right), logging one step per op.

    None if an intermediate result leaves 0..999.
    """
    values, ops = list(values), list(ops)
    i = 0
    while i < len(ops):
        if ops[i] != "*":
            i += 1
            continue
        r = values[i] * values[i + 1]
        steps.append(f"{values[i]}*{values[i + 1]}={r}")
        if not 0 <= r <= 999:
            return None
        values[i : i + 2] = [r]
        del ops[i]
    acc = values[0]
    for op, v in zip(ops, values[1:]):
        r = acc + v if op == "+" else acc - v
        steps.append(f"{acc}{op}{v}={r}")
        if not 0 <= r <= 999:
            return None
        acc = r
    return acc


def _gen_expr(rng: random.Random, d: int) -> Generated:
    n_ops = d + 1
    for _ in range(MAX_TRIES):
        values = [rng.randint(1, 9) for _ in range(n_ops + 1)]
        ops = [rng.choice("+-*") for _ in range(n_ops)]
        lo = hi = -1  # operand indices of the parenthesised span (inclusive); -1: none
        if d >= 2 and rng.random() < 0.5:
            length = rng.randint(2, n_ops)  # never the whole expression
            lo = rng.randint(0, n_ops + 1 - length)
            hi = lo + length - 1
        steps: list[str] = []
        if lo >= 0:
            inner = _eval_flat(values[lo : hi + 1], ops[lo:hi], steps)
            if inner is None:
                continue
            result = _eval_flat(values[:lo] + [inner] + values[hi + 1 :], ops[:lo] + ops[hi:], steps)
        else:
            result = _eval_flat(values, ops, steps)
        if result is None:
            continue
        text = "".join(
            ("(" if k == lo else "") + str(v) + (")" if k == hi else "") + (ops[k] if k < n_ops else "")
            for k, v in enumerate(values)
        )
        return f"calc {text}", steps, str(result)
    raise RuntimeError(f"could not sample an expression at difficulty {d}")


def _sort_range(d: int) -> int:
    """Numbers to sort at level d are below this: 2 digits, then 3, then 4 from level 5."""
    return 100 if d <= 2 else 1000 if d <= 4 else 10000


def _gen_sort(rng: random.Random, d: int) -> Generated:
    numbers = rng.sample(range(_sort_range(d)), d + 2)
    ordered = sorted(numbers)
    return "sort " + " ".join(map(str, numbers)), ["<".join(map(str, ordered))], " ".join(map(str, ordered))


def _mod_divisor_max(d: int) -> int:
    """Divisors at level d go up to this: one digit, then up to 19, then two digits from level 5."""
    return 9 if d <= 2 else 19 if d <= 4 else 99


def _gen_mod(rng: random.Random, d: int) -> Generated:
    a = _rand_digits(rng, d + 1)
    m = rng.randint(2, _mod_divisor_max(d))
    q, r = divmod(a, m)
    return f"mod {a}%{m}", [f"{m}*{q}={m * q}", f"{a}-{m * q}={r}"], str(r)


_KEYS = tuple(a + b for a in string.ascii_lowercase for b in string.ascii_lowercase)
# difficulty -> (facts listed, keys asked): more distractors, then more keys to add up
_LOOKUP_SIZES = {1: (3, 1), 2: (5, 1), 3: (6, 2), 4: (8, 2), 5: (10, 2), 6: (12, 3), 7: (14, 3), 8: (16, 4)}


def _gen_lookup(rng: random.Random, d: int) -> Generated:
    n_facts, n_asked = _LOOKUP_SIZES[d]
    keys = rng.sample(_KEYS, n_facts)
    facts = {k: rng.randint(0, 99) for k in keys}
    asked = rng.sample(keys, n_asked)
    prompt = "facts: " + " ".join(f"{k}={v}" for k, v in facts.items()) + "\nask: " + "+".join(asked)
    steps = [f"{k}={facts[k]}" for k in asked]
    total = facts[asked[0]]
    for k in asked[1:]:  # a running sum, one addition per further key
        steps.append(f"{total}+{facts[k]}={total + facts[k]}")
        total += facts[k]
    return prompt, steps, str(total)


@dataclass(frozen=True)
class Domain:
    """A named problem family with a seeded generator."""

    name: str
    description: str
    _generate: Callable[[random.Random, int], Generated]

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """One problem at `difficulty` (a level of LEVELS), drawn with `rng`."""
        _check_difficulty(difficulty)
        prompt, steps, answer = self._generate(rng, difficulty)
        chain = ",".join(steps) + "\n#### " + answer
        return Problem(prompt=prompt, answer=answer, chain=chain, domain=self.name, difficulty=difficulty)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("add", "column addition with carries", _gen_add),
        Domain("sub", "column subtraction with borrows", _gen_sub),
        Domain("expr", "+ - * expressions with precedence and parentheses", _gen_expr),
        Domain("sort", "sort distinct numbers ascending", _gen_sort),
        Domain("mod", "remainder of a division", _gen_mod),
        Domain("lookup", "retrieve (and add) values of keys listed in the prompt", _gen_lookup),
    )
}


def get_domain(name: str) -> Domain:
    """The domain called `name`; ValueError listing the known ones otherwise."""
    try:
        return DOMAINS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown domain {name!r}; known domains: {', '.join(DOMAINS)}") from None


# ---------------------------------------------------------------------------
# Splits and streams
# ---------------------------------------------------------------------------


def split_of(prompt: str) -> Literal["train", "heldout"]:
    """'heldout' for about 10% of prompts (first sha256 byte % 10 == 0), else 'train'."""
    return "heldout" if hashlib.sha256(prompt.encode("utf-8")).digest()[0] % 10 == 0 else "train"


def _check_difficulty(difficulty: Any) -> None:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {list(LEVELS)}, got {difficulty!r}")


def _cells(domains: Iterable[str] | str | None, difficulties: Iterable[int]) -> list[tuple[Domain, int]]:
    """The (domain, difficulty) pairs to cycle through, validated.

    Difficulty-major: any `len(domains)` consecutive problems cover every domain once.
    """
    names = list(DOMAINS) if domains is None else [domains] if isinstance(domains, str) else list(domains)
    if not names:
        raise ValueError("at least one domain is needed")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate domains in {names}")
    levels = list(difficulties)
    if not levels:
        raise ValueError("at least one difficulty is needed")
    for level in levels:
        _check_difficulty(level)
    if len(set(levels)) != len(levels):
        raise ValueError(f"duplicate difficulties in {levels}")
    return [(get_domain(name), level) for level in levels for name in names]


def rng_for(*parts: object) -> random.Random:
    """A Random seeded from a stable digest of `parts` (never Python's salted hash())."""
    key = "|".join(map(str, parts)).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def in_shard(prompt: str, shard: int, shards: int) -> bool:
    """Whether a problem belongs to a shard: a stable hash of its prompt, so shards are disjoint and random."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % shards == shard


def sample_in_split(domain: Domain, rng: random.Random, difficulty: int, split: str) -> Problem:
    """The next problem of `domain` (anything with `name` and `generate(rng, level)`) that falls in `split`."""
    for _ in range(MAX_TRIES):
        problem = domain.generate(rng, difficulty)
        if split_of(problem.prompt) == split:
            return problem
    raise RuntimeError(f"no {split} problem found for {domain.name} at difficulty {difficulty}")


def iter_problems(
    seed: int | str,
    split: str = "train",
    domains: Sequence[str] | str | None = None,
    difficulties: Sequence[int] = DIFFICULTIES,
) -> Iterator[Problem]:
    """An endless, deterministic stream of problems of one split, round-robin over domains x difficulties."""
    if isinstance(seed, bool) or not isinstance(seed, (int, str)):
        raise ValueError(f"seed must be an integer or a string, got {seed!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    cells = _cells(domains, difficulties)
    rng = rng_for("sandbox", seed, split, ",".join(d.name for d, _ in cells), ",".join(str(k) for _, k in cells))

    def stream() -> Iterator[Problem]:
        for domain, difficulty in itertools.cycle(cells):
            yield sample_in_split(domain, rng, difficulty, split)

    return stream()


def generate_problems(
    n: int,
    seed: int | str,
    split: str = "train",
    domains: Sequence[str] | str | None = None,
    difficulties: Sequence[int] = DIFFICULTIES,
) -> list[Problem]:
    """The first `n` problems of :func:`iter_problems` (balanced over domains x difficulties)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return list(itertools.islice(iter_problems(seed, split, domains, difficulties), n))


# ---------------------------------------------------------------------------
# User datasets (JSONL)
# ---------------------------------------------------------------------------


class DatasetError(ValueError):
    """A dataset file is missing, empty or has invalid lines."""


_MAX_LISTED = 10  # invalid lines described in one error / warning
_MAX_LINE_NUMBERS = 100  # invalid line numbers listed in one warning


def _describe(bad: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:_MAX_LISTED])
    more = f"; ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return shown + more


def _parse_line(raw: bytes) -> Problem:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    return Problem.from_json(obj)


def load_jsonl(path: str | os.PathLike[str], *, skip_invalid: bool = False) -> list[Problem]:
    """Problems from a JSONL file (one object per line: prompt, optional answer/domain/chain/difficulty).

    Invalid lines raise :class:`DatasetError` naming the file and the line numbers, or with
    ``skip_invalid=True`` are skipped with a warning. A missing or empty dataset is an error.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {p}") from None
    except OSError as e:
        raise DatasetError(f"cannot read dataset file {p}: {e}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    problems: list[Problem] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            problems.append(_parse_line(line))
        except (ValueError, TypeError) as e:
            bad.append((number, str(e)))
    if bad and not skip_invalid:
        raise DatasetError(f"{p}: {len(bad)} invalid line(s): {_describe(bad)}")
    if bad:
        lines = ", ".join(str(n) for n, _ in bad[:_MAX_LINE_NUMBERS])
        if len(bad) > _MAX_LINE_NUMBERS:
            lines += f", ... (+{len(bad) - _MAX_LINE_NUMBERS} more)"
        warnings.warn(f"{p}: skipped {len(bad)} invalid line(s): {lines} ({_describe(bad)})", stacklevel=2)
    if not problems:
        raise DatasetError(f"{p}: no problems in dataset (empty file)")
    return problems


def save_jsonl(problems: Iterable[Problem], path: str | os.PathLike[str]) -> None:
    """Write problems as JSONL (one object per line), replacing `path` atomically."""
    p = Path(path)
    lines = []
    for problem in problems:
        if not isinstance(problem, Problem):
            raise TypeError(f"save_jsonl expects Problem objects, got {type(problem).__name__}")
        lines.append(json.dumps(problem.to_json(), ensure_ascii=False) + "\n")
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, p)
