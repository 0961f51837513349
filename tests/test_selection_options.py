"""`evolution.selection_options`: typed per selection rule and refused when the config is read.

Each selection rule's options have a model beside the operator
(:data:`trainer.evolve.operators.SELECTION_OPTIONS`); a misspelt option, a wrong type, an option of
another rule or a value out of range is refused by the config itself, with a message naming the
option and the rule, before any model loads (it used to be a `TypeError` after self-play and
training had run). Nothing here starts an engine.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ensemble_serve.shared.cliutil import ConfigError, load_config
from trainer.evolve import operators
from trainer.evolve.config import EvolutionConfig, EvolveConfig
from trainer.evolve.run import config_hash


@pytest.mark.parametrize("rule", sorted(operators.SELECTION))
def test_every_rule_has_an_option_model_matching_its_keyword_parameters(rule: str) -> None:
    fn = operators.SELECTION[rule]
    keywords = {name: p.default for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    model = operators.SELECTION_OPTIONS[rule]
    assert {name: f.default for name, f in model.model_fields.items()} == keywords
    assert set(operators.SELECTION_OPTIONS) == set(operators.SELECTION)


@pytest.mark.parametrize(
    "rule, options",
    [
        ("tournament", {}),
        ("tournament", {"size": 2}),
        ("truncation", {"fraction": 0.25}),
        ("truncation", {"fraction": 1}),  # an integer is a number
        ("fitness_proportional", {"epsilon": 1e-3}),
    ],
)
def test_good_options_are_kept_as_given(rule: str, options: dict) -> None:
    evo = EvolutionConfig(selection=rule, selection_options=options)
    assert evo.selection_options == options
    assert evo.model_dump(mode="json")["selection_options"] == options  # no defaults filled in: the hash is kept


@pytest.mark.parametrize(
    "rule, options, message",
    [
        ("tournament", {"sise": 3}, "selection 'tournament': unknown option 'sise'; tournament takes size (default 3)"),
        ("truncation", {"fractoin": 0.5}, "selection 'truncation': unknown option 'fractoin'"),
        # an option of another rule: the message says whose it is
        ("truncation", {"size": 3}, "unknown option 'size' (an option of tournament); truncation takes fraction"),
        ("tournament", {"fraction": 0.5}, "unknown option 'fraction' (an option of truncation)"),
        ("fitness_proportional", {"size": 3}, "selection 'fitness_proportional': unknown option 'size'"),
        # wrong types: no silent coercion
        ("tournament", {"size": "3"}, "option 'size': Input should be a valid integer, got '3'"),
        ("tournament", {"size": 3.0}, "option 'size': Input should be a valid integer, got 3.0"),
        ("tournament", {"size": True}, "option 'size': Input should be a valid integer, got True"),
        ("truncation", {"fraction": "half"}, "option 'fraction': Input should be a valid number"),
        ("truncation", {"fraction": False}, "option 'fraction': Input should be a valid number"),
        # out of range
        ("tournament", {"size": 0}, "option 'size': Input should be greater than or equal to 1, got 0"),
        ("truncation", {"fraction": 1.5}, "option 'fraction': Input should be less than or equal to 1"),
        ("truncation", {"fraction": 0}, "option 'fraction': Input should be greater than 0"),
        ("fitness_proportional", {"epsilon": float("inf")}, "option 'epsilon': Input should be a finite number"),
    ],
)
def test_bad_options_are_refused_naming_the_option_and_the_rule(rule: str, options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match="selection_options") as info:
        EvolutionConfig(selection=rule, selection_options=options)
    assert message in str(info.value)


def test_several_bad_options_are_all_named() -> None:
    with pytest.raises(ValidationError) as info:
        EvolutionConfig(selection="tournament", selection_options={"sise": 3, "fraction": 0.5})
    text = str(info.value)
    assert "unknown option 'sise'" in text and "unknown option 'fraction' (an option of truncation)" in text


def test_an_unknown_rule_is_refused_by_the_rule_not_by_its_options() -> None:
    with pytest.raises(ValidationError) as info:
        EvolutionConfig(selection="tournamnet", selection_options={"size": 3})
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("selection",)]
    assert "unknown selection operator 'tournamnet'" in errors[0]["msg"]


def test_a_config_file_with_a_bad_option_is_refused_when_read(tmp_path: Path) -> None:
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump({"evolution": {"selection": "truncation", "selection_options": {"size": 3}}}))
    with pytest.raises(ConfigError) as info:
        load_config(EvolveConfig, path, {})
    text = str(info.value)
    assert str(path) in text and "evolution.selection_options" in text
    assert "selection 'truncation': unknown option 'size' (an option of tournament)" in text


@pytest.mark.parametrize("name", ["evolve.yaml", "evolve-hidden.yaml", "evolve-curriculum.yaml"])
def test_the_shipped_configs_still_read_and_keep_their_options_as_written(name: str) -> None:
    path = Path(__file__).resolve().parent.parent / "configs" / name
    written = yaml.safe_load(path.read_text())["evolution"]["selection_options"]
    cfg = load_config(EvolveConfig, path, {})
    # stored as written (no defaults filled in), so the run's config hash is what it was before the options were typed
    assert cfg.model_dump(mode="json")["evolution"]["selection_options"] == written == {"size": 3}
    assert config_hash(cfg) == config_hash(EvolveConfig.model_validate(cfg.model_dump(mode="json")))


def test_the_field_description_lists_every_rule_s_options() -> None:
    text = EvolutionConfig.model_fields["selection_options"].description
    for rule, model in operators.SELECTION_OPTIONS.items():
        for option in model.model_fields:
            assert f"{rule}: {option}" in text or f", {option}" in text
