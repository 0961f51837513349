"""The reliability table, the `calibrated` vote, and estimating reliability from agreement alone."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import pytest

from ensemble_serve.protocol import ChatCompletionRequest
from ensemble_serve.service.calibration import Calibration
from ensemble_serve.service.metrics import Metrics
from ensemble_serve.service.service import EnsembleService, ServeSettings
from ensemble_serve.shared.population import load_population, read_manifest, write_manifest
from ensemble_serve.shared.population.reliability import (
    P_MAX,
    Estimate,
    ReliabilityError,
    ReliabilityTable,
    log_odds_weight,
    read_reliability,
    smoothed,
    table_entry,
    write_reliability,
)
from ensemble_serve.shared.voting import Candidate, VoteContext, vote
from ensemble_serve.testing.servers import copy_embedded
from trainer.calibration.agreement import fit_one_coin

EMBEDDED = Path(__file__).resolve().parent.parent / "ensemble_serve" / "embedded"
MEMBERS = [f"m0{i}" for i in range(8)]


def _table(members=MEMBERS, base="sandbox-substrate", p=None, **kw) -> ReliabilityTable:
    p = p or {m: 0.6 for m in members}
    est = {m: Estimate(p=v, n=50) for m, v in p.items()}
    return ReliabilityTable(
        base_model=base, members=list(members), method="labelled", domains={"add": est}, overall=est, **kw
    )


def _cand(member: str, answer: str | None) -> Candidate:
    return Candidate(member, 0, f"#### {answer}" if answer else "no answer", answer, "ok" if answer else "missing", 3)


# --------------------------------------------------------------------------- weights


def test_a_p_of_exactly_0_or_1_never_gives_an_infinite_weight():
    assert log_odds_weight(1.0) == pytest.approx(math.log(P_MAX / (1 - P_MAX)))
    assert math.isfinite(log_odds_weight(1.0)) and log_odds_weight(0.0) == 0.0
    assert log_odds_weight(0.5) == 0.0 and log_odds_weight(0.3) == 0.0  # a coin flip or worse does not vote
    assert log_odds_weight(0.9) == pytest.approx(math.log(9))
    assert smoothed(0, 0) == 0.5 and smoothed(10, 10) == pytest.approx(11 / 12)


def test_the_calibrated_vote_trusts_the_reliable_members():
    cands = [_cand("a", "1"), _cand("b", "2"), _cand("c", "2"), _cand("d", "2")]
    weights = {"a": log_odds_weight(0.95), "b": log_odds_weight(0.6), "c": log_odds_weight(0.55), "d": 0.0}
    result = vote(cands, "calibrated", VoteContext(member_weights=weights))
    assert result.answer == "1" and result.rule == "calibrated"  # 2.94 > 0.41 + 0.20
    assert vote(cands, "majority").answer == "2"


def test_a_member_without_a_weight_is_neutral_and_no_weights_is_a_majority_vote():
    cands = [_cand("a", "1"), _cand("b", "2"), _cand("new", "2")]
    result = vote(cands, "calibrated", VoteContext(member_weights={"a": 1.0, "b": 0.5}))
    assert result.answer == "1" and result.votes == {"1": 1.0, "2": 0.5}  # `new` counts 0
    fallback = vote(cands, "calibrated", VoteContext(member_weights={}))
    assert fallback.answer == "2" and fallback.rule == "calibrated->majority"


# --------------------------------------------------------------------------- the table


def test_the_table_round_trips_and_a_subset_of_members_is_fine(tmp_path: Path):
    write_reliability(tmp_path, _table(members=MEMBERS[:6], p={m: 0.7 for m in MEMBERS[:6]}))
    table = read_reliability(tmp_path / "reliability.json", MEMBERS, "sandbox-substrate")
    assert table.estimates("add")["m00"].p == 0.7 and table.estimates("nope") == table.overall
    assert table_entry(table)["path"] == "reliability.json"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: _table(base="other-base").model_dump_json(), "base model 'other-base'"),
        (lambda: _table(members=[*MEMBERS, "m99"]).model_dump_json(), "other members"),
        (lambda: _table(members=["x1", "x2"]).model_dump_json(), "other members"),
        (lambda: "{not json", "unreadable"),
        (lambda: json.dumps({**json.loads(_table().model_dump_json()), "format_version": 9}), "format_version 9"),
        (
            lambda: json.dumps({**json.loads(_table().model_dump_json()), "overall": {"m00": {"p": 1.5, "n": 3}}}),
            "invalid",
        ),
    ],
    ids=["other-base", "extra-member", "disjoint", "corrupt", "version", "p-above-1"],
)
def test_a_table_for_another_population_or_a_broken_one_is_refused(tmp_path: Path, content, message: str):
    (tmp_path / "reliability.json").write_text(content())
    with pytest.raises(ReliabilityError, match=message):
        read_reliability(tmp_path / "reliability.json", MEMBERS, "sandbox-substrate")


# --------------------------------------------------------------------------- agreement alone


def test_agreement_alone_recovers_members_accuracies():
    rng = random.Random(0)
    true = {"a": 0.9, "b": 0.8, "c": 0.65, "d": 0.35, "e": 0.2}
    items = []
    for _ in range(600):
        truth = str(rng.randint(0, 999))
        items.append(
            {
                m: truth if rng.random() < p else (None if rng.random() < 0.2 else str(rng.randint(0, 30)))
                for m, p in true.items()
            }
        )
    fit = fit_one_coin(items, list(true))
    for m, p in true.items():
        assert fit.accuracy[m] == pytest.approx(p, abs=0.06), (m, fit.accuracy)
    assert fit.iterations < 100 and all(abs(sum(post.values()) - 1) < 1e-9 for post in fit.posteriors)


def test_agreement_with_no_answers_says_nothing():
    fit = fit_one_coin([{"a": None, "b": None}] * 5, ["a", "b"])
    assert fit.accuracy == {"a": pytest.approx(1 / 7), "b": pytest.approx(1 / 7)}  # 0 right of 5, smoothed


# --------------------------------------------------------------------------- the server's view


class _Features:
    """Stands in for RouterFeatures: a prompt about `add` points one way, anything else another."""

    def __call__(self, prompts, feature):
        import torch

        return torch.tensor([[1.0, 0.0] if p.startswith("add") else [0.0, 1.0] for p in prompts])


def _population_with(tmp_path: Path, table: ReliabilityTable | None, raw: str | None = None) -> Path:
    root = copy_embedded(tmp_path)
    manifest = read_manifest(root)
    if table is not None or raw is not None:
        if raw is not None:
            (root / "reliability.json").write_text(raw)
        else:
            write_reliability(root, table)
        manifest = manifest.model_copy(update={"reliability": {"path": "reliability.json"}})
    write_manifest(root, manifest)
    return root


def test_the_domain_comes_from_the_nearest_centroid(tmp_path: Path):
    sure = {m: 0.95 for m in MEMBERS}
    table = ReliabilityTable(
        base_model="sandbox-substrate",
        members=MEMBERS,
        method="agreement",
        domains={
            "add": {m: Estimate(p=0.9, n=9) for m in MEMBERS},
            "sort": {m: Estimate(p=0.6, n=9) for m in MEMBERS[:4]},
        },
        overall={m: Estimate(p=v, n=9) for m, v in sure.items()},
        feature="hidden_mean",
        centroids={"add": [1.0, 0.1], "sort": [0.1, 1.0]},
    )
    cal = Calibration.load(load_population(_population_with(tmp_path, table)), features=_Features())
    weights, info = cal.weights_for("add 1+2", MEMBERS)
    assert info["domain"] == "add" and weights["m00"] == pytest.approx(log_odds_weight(0.9))
    weights, info = cal.weights_for("sort 3 1 2", MEMBERS)
    assert info["domain"] == "sort" and set(weights) == set(MEMBERS[:4]) and info["neutral"] == MEMBERS[4:]


@pytest.mark.parametrize("raw", ["{broken", _table(base="elsewhere").model_dump_json()], ids=["corrupt", "other-base"])
def test_a_refused_table_leaves_the_calibrated_vote_a_majority_and_the_server_serving(tmp_path: Path, raw: str):
    from test_serving import ANSWERS, ScriptedBackend, _req

    population = load_population(_population_with(tmp_path, None, raw=raw))
    service = EnsembleService(ScriptedBackend(dict(ANSWERS)), population, ServeSettings(ensemble_name="ens"), Metrics())
    assert service.calibration.status.startswith("refused")
    resp = asyncio.run(service.chat(_req(vote="calibrated")))
    assert resp.ensemble.answer == "3" and resp.ensemble.rule == "calibrated->majority"
    assert resp.ensemble.calibration["used"] is False and "refused" in resp.ensemble.calibration["reason"]


def test_the_calibrated_vote_through_the_service_outvotes_a_wrong_majority(tmp_path: Path):
    from test_serving import ANSWERS, ScriptedBackend, _req

    chains = dict(ANSWERS) | {m: "1+2=4\n#### 4" for m in ("m02", "m03", "m04", "m05", "m06")}  # 5 wrong, 3 right
    p = {m: 0.95 if m in ("m00", "m01", "m07") else 0.55 for m in MEMBERS}
    population = load_population(
        _population_with(tmp_path, _table(members=MEMBERS[:7], p={m: p[m] for m in MEMBERS[:7]}))
    )
    service = EnsembleService(ScriptedBackend(chains), population, ServeSettings(ensemble_name="ens"), Metrics())
    resp = asyncio.run(service.chat(_req(vote="calibrated")))
    ens = resp.ensemble
    assert asyncio.run(service.chat(_req(vote="majority"))).ensemble.answer == "4"
    assert ens.answer == "3" and ens.rule == "calibrated"  # 2 x 2.94 (m07 neutral) > 5 x 0.20
    assert ens.calibration["used"] is True and ens.calibration["neutral"] == ["m07"]


def test_the_population_s_defaults_fill_what_a_request_leaves_unset(tmp_path: Path):
    from test_serving import ANSWERS, ScriptedBackend, _req

    root = _population_with(tmp_path, _table())
    write_manifest(
        root, read_manifest(root).model_copy(update={"ensemble_defaults": {"vote": "calibrated", "members": 3}})
    )
    service = EnsembleService(
        ScriptedBackend(dict(ANSWERS)), load_population(root), ServeSettings(ensemble_name="ens"), Metrics()
    )
    plain = asyncio.run(service.chat(_req()))  # no options at all
    assert plain.ensemble.rule == "calibrated" and len(plain.ensemble.members) == 3
    mixed = asyncio.run(service.chat(_req(vote="majority")))  # the request's own choice wins, the rest is default
    assert mixed.ensemble.rule == "majority" and len(mixed.ensemble.members) == 3


def test_defaults_the_server_cannot_use_are_ignored(tmp_path: Path):
    from test_serving import ANSWERS, ScriptedBackend, _req

    root = _population_with(tmp_path, None)
    write_manifest(root, read_manifest(root).model_copy(update={"ensemble_defaults": {"vote": "plurality"}}))
    service = EnsembleService(
        ScriptedBackend(dict(ANSWERS)), load_population(root), ServeSettings(ensemble_name="ens"), Metrics()
    )
    resp = asyncio.run(service.chat(_req()))
    assert resp.ensemble.rule == "majority" and len(resp.ensemble.members) == 8


def test_a_default_of_several_samples_gives_a_greedy_request_one_chain_per_member(tmp_path: Path):
    from test_serving import ANSWERS, ScriptedBackend

    from ensemble_serve.errors import BadRequestError

    root = _population_with(tmp_path, None)
    defaults = {"members": 2, "samples_per_member": 4, "route": False, "return_chains": True}
    write_manifest(root, read_manifest(root).model_copy(update={"ensemble_defaults": defaults}))
    service = EnsembleService(
        ScriptedBackend(dict(ANSWERS)), load_population(root), ServeSettings(ensemble_name="ens"), Metrics()
    )

    def req(temperature: float, **ensemble) -> ChatCompletionRequest:
        body = {"model": "ens", "messages": [{"role": "user", "content": "add 1+2"}], "max_tokens": 32}
        return ChatCompletionRequest.model_validate({**body, "temperature": temperature, "ensemble": ensemble})

    greedy = asyncio.run(service.chat(req(0.0))).ensemble
    assert len(greedy.chains) == 2 and len(greedy.members) == 2  # not a 400: the default needs sampling
    sampled = asyncio.run(service.chat(req(0.7))).ensemble
    assert len(sampled.chains) == 8
    with pytest.raises(BadRequestError, match="samples_per_member > 1 needs sampling"):
        asyncio.run(service.chat(req(0.0, samples_per_member=4)))  # asked for by the client: still refused


def test_a_default_adaptive_fan_out_applies_unless_the_request_turns_it_off(tmp_path: Path):
    from test_serving import ANSWERS, ScriptedBackend, _req

    root = _population_with(tmp_path, None)
    defaults = {"adaptive": {"confidence": 0.9}}
    write_manifest(root, read_manifest(root).model_copy(update={"ensemble_defaults": defaults}))
    service = EnsembleService(
        ScriptedBackend(dict(ANSWERS)), load_population(root), ServeSettings(ensemble_name="ens"), Metrics()
    )
    plain = asyncio.run(service.chat(_req()))
    assert plain.ensemble.adaptive["confidence"] == 0.9 and plain.ensemble.adaptive["chains"] == 4
    off = asyncio.run(service.chat(_req(adaptive=False)))
    assert off.ensemble.adaptive is None and len(off.ensemble.members) == 8
    early = asyncio.run(service.chat(_req(early_stop=True)))  # the request's own choice, not a 400
    assert early.ensemble.adaptive is None
