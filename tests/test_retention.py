"""What members keep through self-play (trainer/evolve/retention.py): the config's refusals, the validation
problems, replay, teachers, and the guard's decisions (the engine faked: the decision logic only; the real
engine runs it in tests/test_engine_e2e.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from ensemble_serve.shared.lora import load_lora
from ensemble_serve.shared.population import load_population
from ensemble_serve.shared.voting import candidate_from_text
from trainer import scoring
from trainer.evolve.config import EvolveConfig
from trainer.evolve.fitness import Evidence
from trainer.evolve.labels import labellers, member_labels
from trainer.evolve.problems import heldout_problems, validation
from trainer.evolve.retention import (
    RetentionConfig,
    Validation,
    choose_teachers,
    replay_examples,
    retained_examples,
    validation_problems,
)
from trainer.evolve.run import EvolveError
from trainer.tasks.sandbox import Problem, in_shard, save_jsonl

# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"retention": {"teachers": True}}, "needs labels: hidden"),
        ({"data": "x.jsonl", "retention": {"guard": True}}, "needs retention.data"),
        ({"retention": {"max_drop": 1.0}}, "max_drop"),
        ({"retention": {"max_drop": -0.01}}, "max_drop"),
        ({"retention": {"max_drop": float("nan")}}, "max_drop"),
        ({"retention": {"per_level": 0}}, "per_level"),
        ({"retention": {"replay": -1}}, "replay"),
        ({"retention": {"gaurd": True}}, "gaurd"),
    ],
)
def test_bad_retention_settings_are_refused_when_the_config_is_read(settings, message):
    with pytest.raises(ValidationError, match=message):
        EvolveConfig(**settings)


def test_teachers_with_hidden_labels_are_accepted():
    cfg = EvolveConfig(labels="hidden", fitness={"consensus": 1.0}, retention={"teachers": True, "guard": True})
    assert cfg.retention.validates and not EvolveConfig().retention.validates


def test_a_validation_file_without_answers_is_refused_before_anything_runs(tmp_path: Path):
    data = tmp_path / "val.jsonl"
    save_jsonl([Problem("what is 2+2", None, None, "add", 0)], data)
    cfg = EvolveConfig(retention={"guard": True, "data": data})
    with pytest.raises(EvolveError, match="no rows with an `answer`"):
        validation(cfg, [])
    with pytest.raises(EvolveError, match="retention:"):
        validation(EvolveConfig(retention={"guard": True, "data": tmp_path / "missing.jsonl"}), [])


# --------------------------------------------------------------------------- validation problems


def test_validation_problems_cover_every_cell_and_never_the_held_out_test_set():
    cfg = EvolveConfig(domains=("add", "sort"), difficulties=(1, 3), heldout_per_domain=32)
    test = heldout_problems(cfg)
    ret = RetentionConfig(per_level=8, guard=True)
    val = validation_problems(ret, cfg.domains, cfg.difficulties, test)
    assert val == validation_problems(ret, cfg.domains, cfg.difficulties, test)  # fixed over the run
    assert not {p.prompt for p in val} & {p.prompt for p in test}
    cells = {(p.domain, p.difficulty) for p in val}
    assert cells == {(d, lv) for d in cfg.domains for lv in cfg.difficulties}
    assert len(val) <= 8 * 4 and all(p.answer is not None for p in val)
    with pytest.raises(ValueError, match="no validation problems"):
        Validation(ret, [], "auto")


# --------------------------------------------------------------------------- replay


def _member(name: str, **info):
    return SimpleNamespace(name=name, info=info)


def test_replay_is_the_members_own_slice_and_the_same_on_a_rerun():
    add = _member("m00", focus_domain="add", focus_difficulties=[3, 4])
    rows = replay_examples(add, 12, seed=7, generation=2, domains=("add", "sort"), difficulties=(1, 2, 3, 4))
    assert rows == replay_examples(add, 12, seed=7, generation=2, domains=("add", "sort"), difficulties=(1, 2, 3, 4))
    assert len(rows) == 12 and all(prompt and chain.rstrip().split("#### ")[-1] for prompt, chain in rows)
    assert rows != replay_examples(add, 12, seed=7, generation=3, domains=("add",), difficulties=(3,))
    assert all(p.lower().startswith("add") or "+" in p for p, _ in rows)
    assert replay_examples(add, 0, 7, 2, ("add",), (1,)) == []
    shard = _member("m01", shard=[1, 3])
    rows = replay_examples(shard, 6, seed=7, generation=1, domains=("add", "sort"), difficulties=(1,))
    assert len(rows) == 6 and all(in_shard(p, 1, 3) for p, _ in rows)


def test_replay_on_a_dataset_draws_the_members_family_rows_with_chains():
    data = [
        Problem("q1", "1", "w\n#### 1", "a", 0),
        Problem("q2", "2", None, "a", 0),
        Problem("q3", "3", "w\n#### 3", "b", 0),
    ]
    rows = replay_examples(_member("m", focus_domain="a"), 5, 0, 1, ("a", "b"), (0,), dataset=data)
    assert rows == [("q1", "w\n#### 1")] * 5
    assert replay_examples(_member("m", focus_domain="c"), 5, 0, 1, ("a",), (0,), dataset=data) == []


def test_teachers_learn_nothing_and_learners_get_their_replay():
    pop = SimpleNamespace(manifest=SimpleNamespace(members=[_member("t", focus_domain="add"), _member("s")]))
    out = retained_examples(
        {"t": [("p", "c")], "s": [("p", "c")]},
        pop,
        {"add": "t"},
        RetentionConfig(replay=3),
        SimpleNamespace(seed=0, domains=("add",), difficulties=(1,)),
        1,
    )
    assert out["t"] == [] and len(out["s"]) == 4 and out["s"][0] == ("p", "c")


# --------------------------------------------------------------------------- teachers


def test_each_family_is_taught_by_its_best_niche_member():
    pop = SimpleNamespace(
        manifest=SimpleNamespace(
            members=[
                _member("a1", focus_domain="add"),
                _member("a2", focus_domain="add"),
                _member("s1", focus_domain="sort"),
                _member("g"),
            ]
        ),
        names=["a1", "a2", "s1", "g"],
    )
    figures = {
        "a1": {"add": 0.5, "all": 0.5},
        "a2": {"add": 0.75, "all": 0.75},
        "s1": {"sort": 0.25, "all": 0.25},
        "g": {"add": 1.0, "sort": 1.0, "lookup": 0.5, "all": 0.83},
    }
    # the generalist is better on add and sort, but each family has niche members; lookup has none
    assert choose_teachers(pop, figures) == {"add": "a2", "sort": "s1", "lookup": "g"}
    figures["a1"]["add"] = 0.75
    assert choose_teachers(pop, figures)["add"] == "a1"  # first in manifest order on ties


def test_a_teacher_labels_its_family_alone():
    cfg = EvolveConfig(labels="hidden", fitness={"consensus": 1.0}, min_agreement=0.5)
    problems = [Problem("p0", None, None, "add", 1), Problem("p1", None, None, "sort", 1)]
    assert labellers(problems, ["t", "s", "u"], cfg, teachers={"add": "t"}) == [["t"], ["t", "s", "u"]]

    def chain(member, answer):
        return candidate_from_text(member, 0, f"#### {answer}", 3, "auto")

    rows = {"t": ("5", "7"), "s": ("6", "8"), "u": ("6", "8")}
    ev = Evidence(
        members=["t", "s", "u"],
        problems=problems,
        candidates={m: [[chain(m, a)] for a in answers] for m, answers in rows.items()},
        labels_visible=False,
    )
    labels = member_labels(ev, cfg, teachers={"add": "t"})
    assert labels["s"][0] == "5" and labels["u"][0] == "5"  # the teacher, against the majority
    assert labels["s"][1] == "8"  # no teacher for sort: the majority


# --------------------------------------------------------------------------- the guard (engine faked)


class FakeEngine:
    """Answers every prompt right, except a `forgets` member's prompts when the population synced is not
    the original one (its staged, trained weights)."""

    def __init__(self, original: Path, forgets: set[str]):
        self.original, self.forgets, self.root, self.kept = original, forgets, None, set()

    def sync(self, pop):
        self.root = pop.root

    def chat_prompt(self, text):
        return text

    def generate(self, prompts, members, params, progress=False):
        out = []
        for prompt, m in zip(prompts, members):
            answer = self.answers[prompt]
            wrong = m in self.forgets and self.root != self.original and prompt not in self.kept
            out.append([SimpleNamespace(text=f"#### {'x' if wrong else answer}", tokens=3, finish_reason="stop")])
        return out


def test_the_guard_rolls_back_exactly_the_members_that_forgot(embedded_population: Path, monkeypatch):
    monkeypatch.setattr(scoring, "greedy_params", lambda n: None)  # no vLLM import in the fast tier
    pop = load_population(embedded_population)
    names = pop.names[:3]
    pop = pop.__class__(
        root=pop.root,
        manifest=pop.manifest.model_copy(update={"members": pop.manifest.members[:3]}),
        base_model_path=pop.base_model_path,
    )
    ret = RetentionConfig(guard=True, per_level=2)
    problems = validation_problems(ret, ("add", "sub", "expr"), (3, 4), [])
    val = Validation(ret, problems, "auto")
    engine = FakeEngine(pop.root, forgets={names[0]})
    engine.answers = {p.prompt: p.answer for p in problems}
    weights = {m: load_lora(pop.member_dir(m)) for m in names}
    before = val.figures(engine, pop)
    assert all(before[m]["all"] == 1.0 for m in names)
    trained = {names[0]: load_lora(pop.member_dir(names[0])), names[1]: load_lora(pop.member_dir(names[1]))}
    trained[names[2]] = weights[names[2]]  # did not train
    kept, entry = val.guard(engine, pop, before, weights, trained)
    assert entry["rolled_back"] == [names[0]]
    assert kept[names[0]] is weights[names[0]] and kept[names[1]] is trained[names[1]]
    assert entry["members"][names[0]] == {"before": 1.0, "after": 0.0}
    assert entry["members"][names[1]] == {"before": 1.0, "after": 1.0}
    assert entry["members"][names[2]] == {"before": 1.0, "trained": False}
    # "more than" the threshold: a drop of exactly max_drop is kept (the member forgets level 4 only: 0.5)
    engine.kept = {p.prompt for p in problems if p.difficulty == 3}
    for max_drop, rolled in ((0.5, []), (0.49, [names[0]])):
        val = Validation(RetentionConfig(guard=True, per_level=2, max_drop=max_drop), problems, "auto")
        _, entry = val.guard(engine, pop, before, weights, trained)
        assert entry["rolled_back"] == rolled and entry["members"][names[0]]["after"] == 0.5
