"""The natural-language task families for real instruct models (trainer/tasks/natural.py)."""

from __future__ import annotations

import pytest

from ensemble_serve.shared.voting.answers import answers_equal, extract_answer
from trainer.tasks.natural import NATURAL_FAMILIES, NATURAL_LEVELS, get_family, natural_problems
from trainer.tasks.sandbox import load_jsonl, save_jsonl, split_of, verify


@pytest.mark.parametrize("family", list(NATURAL_FAMILIES))
@pytest.mark.parametrize("level", NATURAL_LEVELS)
def test_every_target_reads_back_as_its_answer(family: str, level: int):
    """The target a member learns ends with "The answer is N." and the answer modes read N from it."""
    for p in natural_problems(12, seed=f"{family}-{level}", families=[family], levels=[level]):
        assert p.chain.endswith(".") and "The answer is" in p.chain
        modes = ("natural",) if family == "sort_numbers" else ("natural", "auto")  # auto keeps "4, 17" as text
        for mode in modes:
            assert answers_equal(extract_answer(p.chain, mode).value, p.answer), (mode, p.chain, p.answer)
        assert verify(p, p.chain, "natural").correct


def test_streams_are_seeded_balanced_and_split_by_prompt():
    a = natural_problems(48, seed=3)
    assert a == natural_problems(48, seed=3) and a != natural_problems(48, seed=4)
    assert {p.domain for p in a} == set(NATURAL_FAMILIES)
    assert all(split_of(p.prompt) == "train" for p in a)
    held = natural_problems(48, seed=3, split="heldout")
    assert all(split_of(p.prompt) == "heldout" for p in held)
    assert not {p.prompt for p in a} & {p.prompt for p in held}


def test_the_ladder_grows():
    """Up the ladder: bigger numbers, longer lists, more people and more distractor notes."""

    def mean_len(family: str, level: int) -> float:
        ps = natural_problems(40, seed=9, families=[family], levels=[level])
        return sum(len(p.prompt) + len(p.answer) for p in ps) / len(ps)

    for family in NATURAL_FAMILIES:
        sizes = [mean_len(family, lv) for lv in NATURAL_LEVELS]
        assert sizes[-1] > sizes[0], (family, sizes)


def test_a_users_jsonl_of_the_same_shape_round_trips(tmp_path):
    ps = natural_problems(16, seed=1, split="heldout")
    path = tmp_path / "natural.jsonl"
    save_jsonl(ps, path)
    assert load_jsonl(path) == ps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"families": ["nope"]}, "unknown family 'nope'"),
        ({"families": []}, "at least one"),
        ({"families": ["word_add", "word_add"]}, "distinct"),
        ({"levels": [5]}, "levels must be distinct values"),
        ({"split": "test"}, "unknown split 'test'"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        natural_problems(4, seed=0, **kwargs)


def test_bad_levels_and_counts_are_refused():
    import random

    with pytest.raises(ValueError, match="level must be one of"):
        get_family("compare").generate(random.Random(0), 9)
    with pytest.raises(ValueError, match="non-negative integer"):
        natural_problems(-1, seed=0)
