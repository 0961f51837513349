"""The sandbox: chains re-checked independently of the generators, splits, determinism, JSONL datasets."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from trainer.tasks.sandbox import (
    DOMAINS,
    LEVELS,
    DatasetError,
    Problem,
    Verdict,
    generate_problems,
    get_domain,
    iter_problems,
    load_jsonl,
    save_jsonl,
    split_of,
    verify,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = REPO_ROOT / "ensemble_serve" / "embedded"
ALLOWED_CHARS = {chr(i) for i in range(32, 127)} | {"\n"}  # the character tokenizer's vocabulary
ANSWER_TAIL = re.compile(r"\n#### (\S(?:.*\S)?)\Z")


def split_chain(p: Problem) -> tuple[list[str], str]:
    """Steps and the marked answer of a sandbox chain."""
    m = ANSWER_TAIL.search(p.chain)
    assert m, f"chain does not end with '#### answer': {p.chain!r}"
    body = p.chain[: m.start()]
    assert "\n" not in body
    return body.split(","), m.group(1)


def digits_rev(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]


# --- independent checkers, one per domain --------------------------------------


def check_add(p: Problem, d: int) -> None:
    a, b = map(int, re.fullmatch(r"add (\d+)\+(\d+)", p.prompt).groups())
    assert len(str(a)) == d + 1 and len(str(b)) <= d + 1
    steps, answer = split_chain(p)
    assert answer == p.answer == str(a + b)
    assert len(steps) == d + 1
    carry, out = 0, []
    for x_a, y_b, step in zip(digits_rev(a, d + 1), digits_rev(b, d + 1), steps):
        x, y, plus_one, s = re.fullmatch(r"(\d)\+(\d)(\+1)?=(\d+)", step).groups()
        assert (int(x), int(y)) == (x_a, y_b)
        assert bool(plus_one) == bool(carry)
        assert int(s) == x_a + y_b + carry
        carry, digit = divmod(int(s), 10)
        out.append(str(digit))
    assert ("1" if carry else "") + "".join(reversed(out)) == p.answer


def check_sub(p: Problem, d: int) -> None:
    a, b = map(int, re.fullmatch(r"sub (\d+)-(\d+)", p.prompt).groups())
    assert a >= b and len(str(a)) == d + 1
    steps, answer = split_chain(p)
    assert answer == p.answer == str(a - b)
    assert len(steps) == d + 1
    borrow, out = 0, []
    for x_a, y_b, step in zip(digits_rev(a, d + 1), digits_rev(b, d + 1), steps):
        x, y, minus_one, plus_ten, r = re.fullmatch(r"(\d)-(\d)(-1)?(\+10)?=(\d)", step).groups()
        assert (int(x), int(y)) == (x_a, y_b)
        assert bool(minus_one) == bool(borrow)
        raw = x_a - y_b - borrow
        assert bool(plus_ten) == (raw < 0)
        assert int(r) == raw % 10
        borrow = int(raw < 0)
        out.append(r)
    assert borrow == 0
    assert ("".join(reversed(out)).lstrip("0") or "0") == p.answer


def check_expr(p: Problem, d: int) -> None:
    expr = re.fullmatch(r"calc ([1-9+\-*()]+)", p.prompt).group(1)
    operators = [c for c in expr if c in "+-*"]
    assert len(operators) == d + 1
    assert re.fullmatch(r"\(?[1-9]\)?([+\-*]\(?[1-9]\)?)*", expr)  # operands are single digits
    assert expr.count("(") == expr.count(")") <= (1 if d >= 2 else 0)
    expected = eval(expr, {"__builtins__": {}})  # the charset was checked above
    steps, answer = split_chain(p)
    assert answer == p.answer == str(expected)
    assert len(steps) == d + 1
    for step in steps:
        x, op, y, r = re.fullmatch(r"(\d+)([+\-*])(\d+)=(\d+)", step).groups()
        x, y, r = int(x), int(y), int(r)
        assert r == {"+": x + y, "-": x - y, "*": x * y}[op]
        assert 0 <= r <= 999
    assert int(steps[-1].split("=")[1]) == expected


def check_sort(p: Problem, d: int) -> None:
    numbers = [int(t) for t in re.fullmatch(r"sort (\d+(?: \d+)+)", p.prompt).group(1).split(" ")]
    assert len(numbers) == d + 2 == len(set(numbers))
    assert max(numbers) <= (99 if d <= 2 else 999 if d <= 4 else 9999)
    steps, answer = split_chain(p)
    assert steps == ["<".join(map(str, sorted(numbers)))]
    assert answer == p.answer == " ".join(map(str, sorted(numbers)))


def check_mod(p: Problem, d: int) -> None:
    a, m = map(int, re.fullmatch(r"mod (\d+)%(\d+)", p.prompt).groups())
    assert len(str(a)) == d + 1
    assert 2 <= m <= (9 if d <= 2 else 19 if d <= 4 else 99)
    steps, answer = split_chain(p)
    q = a // m
    assert steps == [f"{m}*{q}={m * q}", f"{a}-{m * q}={a % m}"]
    assert answer == p.answer == str(a % m)


def check_lookup(p: Problem, d: int) -> None:
    facts_line, ask_line = p.prompt.split("\n")
    pairs = re.fullmatch(r"facts: ([a-z]{2}=\d+(?: [a-z]{2}=\d+)*)", facts_line).group(1).split(" ")
    facts = dict(pair.split("=") for pair in pairs)
    assert len(facts) == len(pairs) == {1: 3, 2: 5, 3: 6, 4: 8, 5: 10, 6: 12, 7: 14, 8: 16}[d]
    assert all(0 <= int(v) <= 99 for v in facts.values())
    asked = re.fullmatch(r"ask: ([a-z]{2}(?:\+[a-z]{2})*)", ask_line).group(1).split("+")
    assert len(asked) == {1: 1, 2: 1, 3: 2, 4: 2, 5: 2, 6: 3, 7: 3, 8: 4}[d] == len(set(asked))
    values = [int(facts[k]) for k in asked]
    steps, answer = split_chain(p)
    expected_steps = [f"{k}={facts[k]}" for k in asked]
    running = values[0]
    for v in values[1:]:  # a running sum
        expected_steps.append(f"{running}+{v}={running + v}")
        running += v
    assert steps == expected_steps
    assert answer == p.answer == str(sum(values))


CHECKERS = {
    "add": check_add,
    "sub": check_sub,
    "expr": check_expr,
    "sort": check_sort,
    "mod": check_mod,
    "lookup": check_lookup,
}


def test_every_domain_has_a_checker():
    assert set(DOMAINS) == set(CHECKERS)


@pytest.mark.parametrize("difficulty", list(LEVELS))
@pytest.mark.parametrize("domain", sorted(CHECKERS))
def test_generated_chains_are_correct(domain, difficulty):
    for split in ("train", "heldout"):
        problems = generate_problems(25, seed=11, split=split, domains=[domain], difficulties=[difficulty])
        assert len(problems) == 25
        for p in problems:
            assert (p.domain, p.difficulty) == (domain, difficulty)
            assert set(p.prompt + p.chain) <= ALLOWED_CHARS
            assert p.chain.endswith(f"\n#### {p.answer}")
            CHECKERS[domain](p, difficulty)
            assert verify(p, p.chain) == Verdict(True, p.answer, "correct")


def test_documented_examples():
    p = Problem("sub 603-278", "325", "3-8+10=5,0-7-1+10=2,6-2-1=3\n#### 325", "sub", 2)
    check_sub(p, 2)
    check_add(Problem("add 478+365", "843", "8+5=13,7+6+1=14,4+3+1=8\n#### 843", "add", 2), 2)
    check_mod(Problem("mod 347%7", "4", "7*49=343,347-343=4\n#### 4", "mod", 2), 2)


def test_expr_uses_parentheses_and_precedence():
    problems = generate_problems(200, seed=3, domains=["expr"], difficulties=[3, 4])
    assert any("(" in p.prompt for p in problems)
    assert any("*" in p.prompt and "(" not in p.prompt for p in problems)
    assert not any("(" in p.prompt for p in generate_problems(100, seed=3, domains=["expr"], difficulties=[1]))


# --- verify --------------------------------------------------------------------

ADD = Problem("add 478+365", "843", "8+5=13,7+6+1=14,4+3+1=8\n#### 843", "add", 2)


def test_verify_wrong_answer():
    assert verify(ADD, "8+5=13,7+6=13,4+3=7\n#### 733") == Verdict(False, "733", "wrong")


def test_verify_malformed_marker():
    assert verify(ADD, "8+5=13,7+6+1=14\n#### ") == Verdict(False, None, "malformed")


def test_verify_missing_marker_with_stray_numbers():
    assert verify(ADD, "8+5=13,7+6+1=14,4+3+1=8 843") == Verdict(False, None, "missing")
    assert verify(ADD, "") == Verdict(False, None, "missing")


def test_verify_last_marker_and_number_forms():
    assert verify(ADD, "#### 1\n8+5=13\n#### 843").correct
    assert verify(ADD, "x\n#### 843.0").correct
    assert verify(ADD, "x\n#### 0843").correct


def test_verify_text_answer():
    p = Problem("sort 52 17 83 4", "4 17 52 83", "4<17<52<83\n#### 4 17 52 83", "sort", 2)
    assert verify(p, "4<17<52<83\n####  4  17 52 83 ").correct
    assert verify(p, "4<17<83<52\n#### 4 17 83 52").status == "wrong"


def test_verify_unlabelled_and_custom_spec():
    p = Problem("what is 2+2?", None, None, "user", 0)
    assert verify(p, "#### 4") == Verdict(False, "4", "unlabelled")
    assert verify(p, "nothing") == Verdict(False, None, "unlabelled")
    q = Problem("what is 2+2?", "4", None, "user", 0)
    assert verify(q, "I get 4", spec="number") == Verdict(True, "4", "correct")
    with pytest.raises(ValueError, match="unknown answer mode"):
        verify(q, "#### 4", spec="nope")


# --- determinism, splits, balance -------------------------------------------------


def test_determinism_and_seed_sensitivity():
    a = generate_problems(60, seed=5)
    assert a == generate_problems(60, seed=5)
    assert a != generate_problems(60, seed=6)
    assert generate_problems(30, seed=5) == a[:30]
    assert list(itertools.islice(iter_problems(5), 60)) == a
    assert generate_problems(0, seed=5) == []


@pytest.mark.packaging
def test_determinism_does_not_depend_on_hash_seed():
    code = "import json; from trainer.tasks.sandbox import generate_problems as g; print(json.dumps([p.prompt for p in g(24, 7)]))"
    expected = [p.prompt for p in generate_problems(24, 7)]
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == expected


def test_split_of_matches_sha256():
    for prompt in ("add 1+2", "sort 3 1 2", "facts: ab=1\nask: ab", "héllo"):
        first = hashlib.sha256(prompt.encode("utf-8")).digest()[0]
        assert split_of(prompt) == ("heldout" if first % 10 == 0 else "train")
    share = sum(split_of(f"p{i}") == "heldout" for i in range(5000)) / 5000
    assert 0.07 < share < 0.14


def test_train_and_heldout_are_disjoint():
    train = generate_problems(600, seed=1, split="train")
    heldout = generate_problems(600, seed=1, split="heldout")
    assert all(split_of(p.prompt) == "train" for p in train)
    assert all(split_of(p.prompt) == "heldout" for p in heldout)
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}


def test_balanced_round_robin():
    problems = generate_problems(48, seed=2)
    counts = Counter((p.domain, p.difficulty) for p in problems)
    assert len(counts) == 24 and set(counts.values()) == {2}
    assert [(p.domain, p.difficulty) for p in problems[:5]] == [
        ("add", 1),
        ("sub", 1),
        ("expr", 1),
        ("sort", 1),
        ("mod", 1),
    ]
    assert {p.domain for p in problems[:6]} == {"add", "sub", "expr", "sort", "mod", "lookup"}
    uneven = Counter(p.domain for p in generate_problems(7, seed=2, domains=["mod", "sort"], difficulties=[2]))
    assert uneven == {"mod": 4, "sort": 3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "non-negative"),
        ({"n": 2.5}, "non-negative"),
        ({"domains": ["add", "nope"]}, r"unknown domain 'nope'; known domains: add, sub"),
        ({"domains": []}, "at least one domain"),
        ({"domains": ["add", "add"]}, "duplicate domains"),
        ({"difficulties": [0]}, "difficulty must be one of"),
        ({"difficulties": [9]}, "difficulty must be one of"),
        ({"difficulties": [True]}, "difficulty must be one of"),
        ({"difficulties": []}, "at least one difficulty"),
        ({"split": "test"}, "unknown split 'test'"),
        ({"seed": None}, "seed must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"n": 3, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        generate_problems(**args)


def test_iter_problems_validates_eagerly_and_get_domain():
    with pytest.raises(ValueError, match="unknown domain"):
        iter_problems(0, domains=["zzz"])
    with pytest.raises(ValueError, match="known domains: add, sub, expr, sort, mod, lookup"):
        get_domain("zzz")
    with pytest.raises(ValueError, match="difficulty"):
        import random

        get_domain("add").generate(random.Random(0), LEVELS[-1] + 1)
    assert generate_problems(2, seed=0, domains="mod")[0].domain == "mod"


# --- Problem -------------------------------------------------------------------


def test_problem_json_round_trip_and_validation():
    p = generate_problems(1, seed=0)[0]
    assert Problem.from_json(p.to_json()) == p
    assert Problem.from_json({"prompt": "q", "answer": 3.50}) == Problem("q", "3.5", None, "user", 0)
    with pytest.raises(ValueError, match="difficulty"):
        Problem("q", "1", None, "user", LEVELS[-1] + 1)
    with pytest.raises(ValueError, match="prompt"):
        Problem("  ", "1", None, "user", 0)


# --- JSONL datasets ----------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl_good_file(tmp_path):
    path = write(
        tmp_path,
        '{"prompt": "2+2?", "answer": 4}\n'
        "\n"
        '{"prompt": "big", "answer": "1,000", "domain": "math", "chain": "x\\n#### 1000"}\n'
        "   \n"
        '{"prompt": "capital of France", "answer": " Paris. ", "extra": 1}\n'
        '{"prompt": "open question", "answer": null}\n'
        '{"prompt": "half", "answer": 0.50, "difficulty": 2}\n',
    )
    problems = load_jsonl(path)
    assert problems == [
        Problem("2+2?", "4", None, "user", 0),
        Problem("big", "1000", "x\n#### 1000", "math", 0),
        Problem("capital of France", "Paris", None, "user", 0),
        Problem("open question", None, None, "user", 0),
        Problem("half", "0.5", None, "user", 2),
    ]


GOOD = '{"prompt": "ok", "answer": "1"}\n'


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"prompt": "unclosed"', "invalid JSON"),
        ('["prompt", "x"]', "expected a JSON object, got array"),
        ('"just a string"', "expected a JSON object, got string"),
        ('{"answer": "1"}', "missing required field 'prompt'"),
        ('{"prompt": "   "}', "'prompt' is empty"),
        ('{"prompt": 12}', "'prompt' must be a string, got number"),
        ('{"prompt": "q", "answer": [1]}', "'answer' must be a string or a number, got array"),
        ('{"prompt": "q", "answer": true}', "'answer' must be a string or a number, got boolean"),
        ('{"prompt": "q", "answer": NaN}', "finite"),
        ('{"prompt": "q", "answer": "  "}', "'answer' is empty"),
        ('{"prompt": "q", "domain": 3}', "'domain' must be a non-empty string"),
        ('{"prompt": "q", "chain": {"a": 1}}', "'chain' must be a string, got object"),
        ('{"prompt": "q", "difficulty": 9}', "'difficulty' must be an integer"),
    ],
)
def test_load_jsonl_malformed_line(tmp_path, bad_line, reason):
    path = write(tmp_path, GOOD + "\n" + bad_line + "\n" + GOOD)
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert str(path) in message and "line 3:" in message and reason in message
    assert isinstance(info.value, ValueError)


def test_load_jsonl_lists_all_bad_lines(tmp_path):
    path = write(tmp_path, "oops\n" + GOOD + '{"prompt": ""}\n' + GOOD + "[]\n")
    with pytest.raises(DatasetError, match=r"3 invalid line\(s\): line 1: .*; line 3: .*; line 5: "):
        load_jsonl(path)


def test_load_jsonl_skip_invalid_warns(tmp_path):
    path = write(tmp_path, GOOD + "not json\n" + GOOD + '{"prompt": 1}\n')
    with pytest.warns(UserWarning, match=r"skipped 2 invalid line\(s\): 2, 4") as record:
        problems = load_jsonl(path, skip_invalid=True)
    assert problems == [Problem("ok", "1", None, "user", 0)] * 2
    assert str(path) in str(record[0].message)


def test_load_jsonl_skip_invalid_all_bad_is_empty(tmp_path):
    path = write(tmp_path, "nope\n")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no problems"):
        load_jsonl(path, skip_invalid=True)


def test_load_jsonl_bad_utf8(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(GOOD.encode() + b'{"prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match="line 2: not valid UTF-8"):
        load_jsonl(path)


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_load_jsonl_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(DatasetError, match="no problems") as info:
        load_jsonl(path)
    assert str(path) in str(info.value)


def test_load_jsonl_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DatasetError, match="not found") as info:
        load_jsonl(path)
    assert str(path) in str(info.value)


def test_save_load_round_trip(tmp_path):
    problems = generate_problems(30, seed=9) + [
        Problem("free form ünïcode question", None, None, "user", 0),
        Problem("q2", "Paris", "think\n#### Paris", "geo", 0),
    ]
    path = tmp_path / "out.jsonl"
    save_jsonl(problems, path)
    assert load_jsonl(path) == problems
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(problems)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TypeError, match="Problem objects"):
        save_jsonl([{"prompt": "x"}], path)  # type: ignore[list-item]


def test_the_ladder_gets_harder_level_by_level():
    """Every family's problems grow with the level: more digits, steps, items, distractors or keys to read."""
    for domain in DOMAINS:
        sizes = [
            sum(
                len(p.prompt) + len(p.chain) for p in generate_problems(40, seed=5, domains=[domain], difficulties=[lv])
            )
            / 40
            for lv in LEVELS
        ]
        assert all(b > a for a, b in zip(sizes, sizes[1:])), (domain, sizes)
        assert sizes[-1] > 2 * sizes[0], (domain, sizes)


def test_the_hardest_level_fits_the_embedded_context():
    """Prompt (in the chat template) plus chain stays within the substrate's 256-token context at every level."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED / "substrate"))
    worst = 0
    for p in generate_problems(8 * len(DOMAINS) * 20, seed=9, difficulties=list(LEVELS)):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
        )
        worst = max(worst, len(tok.encode(prompt + p.chain, add_special_tokens=False)))
    assert worst <= 256 - 16, worst
