"""The decomposition study's probes in the ablation harness: alpha = 0 inheritance, a misaligned start,
the base-perturbation probe, and one starting population per seed.

Fast: the configs, the stage folders and settings, the misaligned and random starts written from the
embedded population (no engine), the perturbed base's weights, and the report of the probe from a
fake runner. The probe's scoring on the real engine runs in tests/test_ablate_e2e.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from test_ablate import FakeRunner

from ensemble_serve.shared.embedded import EMBEDDED_POPULATION
from ensemble_serve.shared.lora import load_lora
from ensemble_serve.shared.population import load_population
from trainer.models.mixture_lm import MixtureLM, MixtureLMError
from trainer.study.ablate import AblationError, format_report, plan, run_ablation
from trainer.study.ablate.config import AblateConfig
from trainer.study.ablate.design import Cell, config_hash
from trainer.study.ablate.stages import EvolveStages, misaligned_weights

LIFECYCLE = {"death_fitness": 10.0, "max_deaths": 1, "inherit_alpha": 0.5}


def make_cfg(out: Path, **kw: Any) -> AblateConfig:
    settings: dict[str, Any] = {"factors": ("router", "scope"), "seeds": (0, 1), "generations": 1}
    settings.update(kw)
    return AblateConfig(out=out, **settings)


# --------------------------------------------------------------------------- the configs


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"factors": ("inheritance",)}, "needs the lifecycle"),
        ({"factors": ("router",), "fixed": {"inheritance": "none"}}, "needs the lifecycle"),
        (
            {"factors": ("inheritance",), "fixed": {"lifecycle": "on"}, "evolve": {"lifecycle": {"death_fitness": 1}}},
            "inherit_alpha is 0",
        ),
        (
            {
                "factors": ("inheritance",),
                "fixed": {"lifecycle": "on"},
                "evolve": {"lifecycle": {"inherit_alpha": 0.5}},
            },
            "no member can die",
        ),
        ({"factors": ("alignment",)}, "share_chains"),
        ({"factors": ("alignment",), "evolve": {"share_chains": False}}, "share_chains"),
        (
            {"factors": ("alignment",), "fixed": {"init": "random"}, "evolve": {"share_chains": "niche"}},
            "nothing to misalign",
        ),
        ({"population": "runs/pop-{member}"}, "only placeholder"),
        ({"population": "runs/pop-{0}"}, "only placeholder"),
        ({"population": "runs/pop-{seed"}, "only placeholder"),
        ({"base_perturbation": 0}, "greater than 0"),
        ({"base_perturbation": -0.1}, "greater than 0"),
        ({"base_perturbation": math.inf}, "finite"),
        ({"base_perturbation": math.nan}, "finite"),
        ({"factors": ("alignment", "alignment")}, "listed twice"),
        ({"fixed": {"alignment": "sideways"}}, "levels"),
        ({"fixed": {"inheritance": "half"}}, "levels"),
    ],
)
def test_probe_configs_that_would_measure_nothing_are_refused(settings: dict[str, Any], message: str, tmp_path):
    with pytest.raises(ValidationError, match=message):
        make_cfg(tmp_path / "x", **settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"factors": ("inheritance",), "fixed": {"lifecycle": "on"}, "evolve": {"lifecycle": LIFECYCLE}},
        {"factors": ("inheritance", "lifecycle"), "evolve": {"lifecycle": LIFECYCLE}},
        {"factors": ("alignment", "evolution"), "evolve": {"share_chains": "niche"}},
        {"factors": ("alignment",), "evolve": {"share_chains": "experts"}},
        {"factors": ("alignment",), "evolve": {"niche": True}},
        {"factors": ("alignment", "init"), "evolve": {"share_chains": "niche"}},
        {"population": "runs/recipe/seed{seed}-s0.5", "base_perturbation": 0.1},
    ],
)
def test_probe_configs_that_change_something_are_accepted(settings: dict[str, Any], tmp_path):
    make_cfg(tmp_path / "x", **settings)


def test_population_per_seed(tmp_path):
    cfg = make_cfg(tmp_path / "x", population="runs/recipe/seed{seed}-s0.5")
    assert cfg.population_for(2) == Path("runs/recipe/seed2-s0.5")
    assert make_cfg(tmp_path / "x").population_for(2) is None
    assert make_cfg(tmp_path / "x", population="runs/one").population_for(2) == Path("runs/one")


def test_stage_names_of_old_ablations_are_kept_and_probes_name_their_stage(tmp_path):
    cfg = make_cfg(tmp_path / "x", factors=("router", "scope"))
    assert {c.stage for c in plan(cfg)} == {
        "init-pre_aligned__evolution-on__scope-global__lifecycle-off",
        "init-pre_aligned__evolution-on__scope-domain_loo__lifecycle-off",
    }
    probes = make_cfg(
        tmp_path / "y", factors=("alignment", "inheritance"), fixed={"lifecycle": "on"},
        evolve={"lifecycle": LIFECYCLE, "share_chains": "niche"},
    )  # fmt: skip
    stages = sorted(c.stage for c in plan(probes))
    assert len(set(stages)) == 4
    assert stages[0] == "init-pre_aligned__evolution-on__scope-global__lifecycle-on"
    assert stages[-1].endswith("__inheritance-none__alignment-misaligned")


def test_the_probe_enters_the_config_hash_only_when_on(tmp_path):
    cfg = make_cfg(tmp_path / "a")
    payload = cfg.model_dump(mode="json", exclude={"seeds", "out", "threads", "gpu_memory_utilization", "interactions"})
    assert "base_perturbation" in payload  # the hash below leaves it out when off: old folders resume
    assert config_hash(cfg) == config_hash(make_cfg(tmp_path / "b", base_perturbation=None))
    assert config_hash(cfg) != config_hash(make_cfg(tmp_path / "a", base_perturbation=0.1))
    assert config_hash(make_cfg(tmp_path / "a", base_perturbation=0.1)) != config_hash(
        make_cfg(tmp_path / "a", base_perturbation=0.2)
    )


def test_inheritance_none_is_the_lifecycle_with_alpha_zero(tmp_path):
    cfg = make_cfg(tmp_path / "x", factors=("inheritance",), fixed={"lifecycle": "on"}, evolve={"lifecycle": LIFECYCLE})
    stages = EvolveStages(cfg)
    try:
        by_level = {
            c.levels["inheritance"]: stages.evolve_config(c.levels, 0, EMBEDDED_POPULATION, tmp_path / "o")
            for c in plan(cfg)
        }
    finally:
        stages.close()
    assert by_level["blend"].lifecycle.inherit_alpha == 0.5
    assert by_level["none"].lifecycle.inherit_alpha == 0.0
    for ec in by_level.values():  # everything else is the same run
        assert ec.lifecycle.enabled and ec.lifecycle.death_fitness == 10.0 and ec.lifecycle.max_deaths == 1


# --------------------------------------------------------------------------- the misaligned start


def fake_population(*focus: str | None) -> Any:
    members = [SimpleNamespace(name=f"m{i:02d}", info={"focus_domain": f} if f else {}) for i, f in enumerate(focus)]
    return SimpleNamespace(root=Path("pop"), manifest=SimpleNamespace(members=members))


@pytest.mark.parametrize(
    "focus",
    [
        ("add", "sub", "expr", "sort", "mod", "lookup", None),  # a branched population: the seed keeps its own
        ("add", "add", "sub", "sub"),  # two a family in name order: a shift of one would not do
        ("add", "sub", "add", "sub", "expr", "expr"),
        ("add", "sub"),
    ],
)
def test_misaligned_weights_move_every_specialist_off_its_family(focus):
    pop = fake_population(*focus)
    held = misaligned_weights(pop)
    family = {m.name: m.info.get("focus_domain") for m in pop.manifest.members}
    focused = sorted(n for n, f in family.items() if f)
    assert sorted(held) == focused and sorted(held.values()) == focused  # a permutation of the specialists
    assert all(family[src] != family[n] for n, src in held.items())


@pytest.mark.parametrize(
    "focus, message",
    [
        ((None, None), "at least two families"),
        (("add", "add", None), "at least two families"),
        (("add", "add", "add", "sub"), "more than half"),
    ],
)
def test_a_population_that_cannot_be_misaligned_is_refused(focus, message):
    with pytest.raises(AblationError, match=message):
        misaligned_weights(fake_population(*focus))


def _probe_cfg(out: Path, **kw: Any) -> AblateConfig:
    return make_cfg(out, factors=("alignment", "init"), evolve={"share_chains": "niche"}, **kw)


def _holds(pop_dir: Path, source_dir: Path) -> dict[str, str]:
    """Whose weights of the source each member of pop_dir holds (byte-equal factors)."""
    pop, src = load_population(pop_dir), load_population(source_dir)
    src_w = {n: load_lora(src.member_dir(n)) for n in src.names}
    out = {}
    for n in pop.names:
        w = load_lora(pop.member_dir(n))
        same = [
            m for m, v in src_w.items() if all(torch.equal(w.factors[k][i], v.factors[k][i]) for k in w.factors for i in (0, 1))
        ]  # fmt: skip
        out[n] = same[0] if len(same) == 1 else ",".join(same)
    return out


def test_the_misaligned_start_holds_another_familys_weights_and_says_whose(tmp_path):
    cfg = _probe_cfg(tmp_path / "x")
    levels = {c.levels["alignment"] + "/" + c.levels["init"]: c.levels for c in plan(cfg)}
    stages = EvolveStages(cfg)
    try:
        assert stages.start(levels["aligned/pre_aligned"], 0) == EMBEDDED_POPULATION
        root = stages.start(levels["misaligned/pre_aligned"], 0)
        again = stages.start(levels["misaligned/pre_aligned"], 0)
    finally:
        stages.close()
    assert root == again == cfg.out / "starts" / "misaligned-seed-0"
    pop, src = load_population(root), load_population(EMBEDDED_POPULATION)
    family = {m.name: m.info["focus_domain"] for m in src.manifest.members}
    holds = _holds(root, EMBEDDED_POPULATION)
    assert sorted(holds.values()) == sorted(src.names)
    for m in pop.manifest.members:
        assert m.info["focus_domain"] == family[m.name]  # the slot keeps its family ...
        assert family[holds[m.name]] != family[m.name]  # ... and holds another family's specialist
        assert m.info["weights_of"] == holds[m.name]
        assert m.fitness is None and m.parents == []
    assert pop.base_model_path.resolve() == src.base_model_path.resolve()


def test_a_random_start_is_unchanged_by_the_alignment_level(tmp_path):
    cfg = _probe_cfg(tmp_path / "x")
    stages = EvolveStages(cfg)
    try:
        roots = {stages.start(c.levels, 1) for c in plan(cfg) if c.levels["init"] == "random"}
    finally:
        stages.close()
    assert roots == {cfg.out / "starts" / "random-seed-1"}  # misaligned random adapters are random adapters
    pop = load_population(next(iter(roots)))
    assert all("weights_of" not in m.info for m in pop.manifest.members)
    w = load_lora(pop.member_dir(pop.names[0]))
    assert all(float(b.abs().max()) == 0.0 for _, b in w.factors.values())  # B = 0: PEFT's initialisation


def test_each_seed_starts_from_its_own_population(tmp_path):
    for seed in (0, 1):
        (tmp_path / f"pop{seed}").symlink_to(EMBEDDED_POPULATION, target_is_directory=True)
    cfg = _probe_cfg(tmp_path / "x", population=str(tmp_path / "pop{seed}"))
    (cell,) = [c for c in plan(cfg) if c.levels["alignment"] == "aligned" and c.levels["init"] == "pre_aligned"]
    stages = EvolveStages(cfg)
    try:
        assert stages.start(cell.levels, 1) == tmp_path / "pop1"
        assert stages.source(0) == tmp_path / "pop0"
    finally:
        stages.close()


def test_a_misaligned_start_of_a_population_without_specialists_fails_its_cell_clearly(tmp_path):
    pop = load_population(EMBEDDED_POPULATION)
    plain = tmp_path / "plain"
    shutil.copytree(EMBEDDED_POPULATION, plain)
    manifest = json.loads((plain / "population.json").read_text())
    for m in manifest["members"]:
        m["info"].pop("focus_domain", None)
    manifest["base_model"]["path"] = str(pop.base_model_path.resolve())
    (plain / "population.json").write_text(json.dumps(manifest))
    cfg = _probe_cfg(tmp_path / "x", population=str(plain))
    (cell,) = [c for c in plan(cfg) if c.levels["alignment"] == "misaligned" and c.levels["init"] == "pre_aligned"]
    stages = EvolveStages(cfg)
    try:
        with pytest.raises(AblationError, match="at least two families"):
            stages.start(cell.levels, 0)
    finally:
        stages.close()
    assert not (cfg.out / "starts" / "misaligned-seed-0").exists()  # nothing half-written


# --------------------------------------------------------------------------- the perturbed base


@pytest.fixture(scope="module")
def members():
    pop = load_population(EMBEDDED_POPULATION)
    return pop, [load_lora(pop.member_dir(n)) for n in pop.names[:2]]


def _params(lm: MixtureLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_the_perturbed_base_is_seeded_relative_and_leaves_norms_and_adapters(members):
    pop, weights = members
    before = [w.factors[k][1].clone() for w in weights for k in sorted(w.factors)]
    plain = _params(MixtureLM(pop.base_model_path, weights, pop.names[:2]))
    a = MixtureLM(pop.base_model_path, weights, pop.names[:2])
    b = MixtureLM(pop.base_model_path, weights, pop.names[:2])
    c = MixtureLM(pop.base_model_path, weights, pop.names[:2])
    done = a.perturb_base(0.1, 7)
    b.perturb_base(0.1, 7)
    c.perturb_base(0.1, 8)
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert done and all(plain[n].dim() >= 2 for n in done)
    for name, p in plain.items():
        if p.dim() < 2:
            assert torch.equal(pa[name], p), name  # norms and biases stay
            continue
        assert torch.equal(pa[name], pb[name])  # the same seed, the same base
        assert not torch.equal(pa[name], pc[name])  # another seed, another base
        delta = pa[name] - p
        rel = float(delta.pow(2).mean().sqrt() / p.pow(2).mean().sqrt())
        assert 0.08 < rel < 0.12, (name, rel)  # sigma relative to the matrix's RMS
    after = [w.factors[k][1] for w in weights for k in sorted(w.factors)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("sigma", [0.0, -0.1, math.inf, math.nan])
def test_a_bad_perturbation_is_refused(members, sigma):
    pop, weights = members
    lm = MixtureLM(pop.base_model_path, weights, pop.names[:2])
    with pytest.raises(MixtureLMError, match="finite sigma"):
        lm.perturb_base(sigma, 0)


# --------------------------------------------------------------------------- the probe's report


class PerturbedRunner(FakeRunner):
    """The fake runner's results, plus the perturbed base's: every log-PPL doubled, so every effect doubles."""

    def run(self, cell: Cell, seed: int, note):
        out = super().run(cell, seed, note)
        out["perturbed"] = {
            "balanced_log_ppl": 2 * out["balanced_log_ppl"],
            "per_domain": {d: 2 * v for d, v in out["per_domain"].items()},
            "reference": {**out["reference"], "base": {"balanced_log_ppl": 3.0, "per_domain": {}}},
        }
        return out


def test_the_report_gives_every_effect_on_the_perturbed_base_beside_the_plain_one(tmp_path):
    cfg = make_cfg(tmp_path / "x", factors=("router", "scope"), seeds=(0, 1, 2), base_perturbation=0.1)
    summary = run_ablation(cfg, PerturbedRunner(), progress=False)
    probe = summary["perturbed"]
    assert probe["sigma"] == 0.1 and probe["seed"] == cfg.eval_seed
    plain, perturbed = summary["effects"]["router"]["mean"], probe["effects"]["router"]["mean"]
    assert plain > 0.01 and perturbed == pytest.approx(2 * plain)  # test_ablate's router gain, doubled
    assert probe["effects"]["scope"]["mean"] == pytest.approx(2 * summary["effects"]["scope"]["mean"])
    assert all(row["perturbed"]["n"] == 3 and row["perturbed_base"]["mean"] == 3.0 for row in summary["cells"])
    md = (cfg.out / "ablation.md").read_text()
    assert "Effects on a perturbed base (sigma = 0.1" in md
    assert f"| router (softmax -> sigmoid_floor) | {perturbed:.5f} |" in md and f"plain base: {plain:.5f}" in md
    assert "Cells on the perturbed base" in md
    assert format_report(summary) == md


def test_without_the_probe_the_report_has_no_perturbed_part(tmp_path):
    cfg = make_cfg(tmp_path / "x", seeds=(0, 1))
    summary = run_ablation(cfg, FakeRunner(), progress=False)
    assert "perturbed" not in summary and all("perturbed" not in row for row in summary["cells"])
    assert "perturbed" not in (cfg.out / "ablation.md").read_text()
