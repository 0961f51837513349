"""One ablation cell for real: the evolve stage, then router training and mixture scoring of held-out chains.

:class:`CellRunner` runs ``(cell, seed)`` in three steps (see the package docstring): the stage's
evolved population (:class:`trainer.study.ablate.stages.EvolveStages`), a router trained on
``router_per_domain`` sandbox prompts per domain (on per-member quality, or end to end through the
mixture), and the balanced log-PPL of the held-out reference chains under the routed mixture.
One copy of the base model serves the router features, and each stage's mixture model and member
scores (:class:`StageScores`) are kept while the cells of that stage run. A stage that failed is
not run again for the other cells of the same stage in this run: they fail with its error.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ensemble_serve.shared.lora import load_lora
from ensemble_serve.shared.population import Population, load_population
from ensemble_serve.shared.router import DEFAULT_FEATURE, Router, RouterFeatures
from trainer.models.mixture_lm import (
    MixtureLM,
    domain_nll,
    encode_chains,
    member_nll,
    mixture_weights,
    train_router_mixture,
)
from trainer.router.train import (
    RouterTrainConfig,
    specialisation_score,
    specialisation_table,
    targets_from_loglik,
    train_router,
)
from trainer.study.ablate.config import AblateConfig
from trainer.study.ablate.design import AblationError, Cell
from trainer.study.ablate.stages import EvolveStages
from trainer.study.stats import balanced_log_ppl
from trainer.tasks.sandbox import Problem, generate_problems

__all__ = ["CellRunner", "StageScores"]


@dataclass(frozen=True)
class StageScores:
    """What every cell of one evolved stage shares: the mixture model, the problems, and the member scores."""

    population: Population
    lm: MixtureLM
    train: list[Problem]
    heldout: list[Problem]
    enc_train: list[tuple[list[int], list[int]]]
    enc_held: list[tuple[list[int], list[int]]]
    train_loglik: torch.Tensor
    """``[train prompts, members]``: each member's mean token log-likelihood of the reference chain."""
    reference: dict[str, Any]
    """The uniform mixture, the best single member and the bare base on the held-out chains."""
    perturbed: tuple[MixtureLM, dict[str, Any]] | None = None
    """The base-perturbation probe: the same members on the perturbed base, and its references (None: off)."""


class CellRunner:
    """Runs cells for real: evolve (vLLM self-play, PEFT training) then router training and mixture scoring."""

    def __init__(self, cfg: AblateConfig, progress: bool = False) -> None:
        self.cfg = cfg
        self.stages = EvolveStages(cfg, progress=progress)
        self.features: RouterFeatures | None = None
        self._stage_cache: tuple[Path, StageScores] | None = None
        self._failed_stages: dict[str, str] = {}
        torch.set_num_threads(cfg.threads)

    def close(self) -> None:
        self.features = None
        self._stage_cache = None
        self.stages.close()

    def run(self, cell: Cell, seed: int, note: Callable[[str], None]) -> dict[str, Any]:
        """The cell's result: balanced log-PPL and per domain, the references, the router, the stage, timings."""
        key = f"{cell.stage}/{seed}"
        if key in self._failed_stages:
            raise AblationError(f"its evolve stage failed earlier in this run: {self._failed_stages[key]}")
        note("evolve")
        t0 = time.perf_counter()
        population_dir, stage = self._stage(cell, seed, key)
        t1 = time.perf_counter()
        note("score members")
        s = self._scores(population_dir, seed)
        rcfg = RouterTrainConfig(**{**self.cfg.router, "variant": cell.levels["router"], "seed": seed})
        feature = rcfg.feature or DEFAULT_FEATURE[rcfg.variant]
        x_train = self.features([p.prompt for p in s.train], feature)
        x_held = self.features([p.prompt for p in s.heldout], feature)
        note("router")
        t2 = time.perf_counter()
        router, metrics = self._train_router(s, x_train, rcfg)
        t3 = time.perf_counter()
        note("evaluate")
        summary, held_table = self._evaluate(s, router, x_held)
        probe = {}
        if s.perturbed is not None:
            lm, reference = s.perturbed
            probe = {"perturbed": {**self._evaluate(s, router, x_held, lm)[0], "reference": reference}}
        return {
            **summary,
            **probe,
            "reference": s.reference,
            "router": {
                "variant": rcfg.variant,
                "feature": feature,
                "objective": self.cfg.router_objective,
                "final_loss": metrics["final_loss"],
                "mean_gate": metrics["mean_gate"],
                "specialisation_score": specialisation_score(held_table),
                "specialisation": held_table,
            },
            "stage": stage,
            "seconds": {
                "evolve": round(t1 - t0, 2),
                "score": round(t2 - t1, 2),
                "router": round(t3 - t2, 2),
                "evaluate": round(time.perf_counter() - t3, 2),
            },
        }

    # -- the steps of a cell

    def _stage(self, cell: Cell, seed: int, key: str) -> tuple[Path, dict[str, Any]]:
        """The cell's evolved stage; a stage that raises is remembered under ``key`` (its other cells then fail)."""
        try:
            return self.stages.stage(cell.levels, seed)
        except Exception as e:
            self._failed_stages[key] = f"{type(e).__name__}: {e}"
            raise

    def _problems(self, seed: int) -> tuple[list[Problem], list[Problem]]:
        """The router's training prompts (per seed) and the held-out prompts (the same for every cell)."""
        domains = list(self.stages.evolve_base.domains)
        diffs = list(self.stages.evolve_base.difficulties)
        train = generate_problems(
            self.cfg.router_per_domain * len(domains), seed=seed, split="train", domains=domains, difficulties=diffs
        )
        heldout = generate_problems(
            self.cfg.heldout_per_domain * len(domains),
            seed=self.cfg.eval_seed,
            split="heldout",
            domains=domains,
            difficulties=diffs,
        )
        return train, heldout

    def _scores(self, population_dir: Path, seed: int) -> StageScores:
        """The stage's mixture model, features and member scores (kept for the next cell of the same stage)."""
        if self._stage_cache is not None and self._stage_cache[0] == population_dir:
            return self._stage_cache[1]
        self._stage_cache = None
        gc.collect()
        pop = load_population(population_dir)
        if pop.base_model_path is None:
            raise AblationError(f"{population_dir}: the base model must be a local folder (router features)")
        if self.features is None or self.features.model_dir.resolve() != pop.base_model_path.resolve():
            self.features = RouterFeatures(pop.base_model_path)
        weights = [load_lora(pop.member_dir(n)) for n in pop.names]
        lm = MixtureLM(pop.base_model_path, weights, pop.names)
        train, heldout = self._problems(seed)
        enc_train, enc_held = encode_chains(lm, train), encode_chains(lm, heldout)
        train_nll, train_count = member_nll(lm, enc_train)
        perturbed = None
        if self.cfg.base_perturbation is not None:
            plm = MixtureLM(pop.base_model_path, weights, pop.names)
            plm.perturb_base(self.cfg.base_perturbation, self.cfg.eval_seed)
            perturbed = (plm, _reference(plm, pop.names, heldout, enc_held))
        scores = StageScores(
            population=pop,
            lm=lm,
            train=train,
            heldout=heldout,
            enc_train=enc_train,
            enc_held=enc_held,
            train_loglik=-(train_nll / train_count.clamp(min=1).unsqueeze(1)),
            reference=_reference(lm, pop.names, heldout, enc_held),
            perturbed=perturbed,
        )
        self._stage_cache = (population_dir, scores)
        return scores

    def _train_router(
        self, s: StageScores, x_train: torch.Tensor, rcfg: RouterTrainConfig
    ) -> tuple[Router, dict[str, Any]]:
        """The router on the training prompts: towards per-member quality, or end to end through the mixture."""
        domains = [p.domain for p in s.train]
        base_model = s.population.manifest.base_model.name
        if self.cfg.router_objective == "quality":
            quality = targets_from_loglik(s.train_loglik, self.cfg.quality_tau)
            return train_router(x_train, quality, s.population.names, base_model, rcfg, domains=domains)
        return train_router_mixture(s.lm, x_train, s.enc_train, base_model, rcfg, domains=domains)

    def _evaluate(
        self, s: StageScores, router: Router, x_held: torch.Tensor, lm: MixtureLM | None = None
    ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        """The held-out chains under the routed mixture (on ``lm``, default the stage's), and the mean gates per domain."""
        with torch.no_grad():
            gates = router(x_held)
        weights = mixture_weights(gates, self.cfg.top_k)
        routed = domain_nll(lm or s.lm, s.heldout, weights, encoded=s.enc_held)
        held_table = specialisation_table(gates, [p.domain for p in s.heldout], s.population.names)
        return _domain_summary(routed), held_table


def _per_domain(problems: Sequence[Problem], nll: torch.Tensor, counts: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Sum of one member's chain NLL and token count per domain (``nll``, ``counts``: one per problem)."""
    acc: dict[str, list] = {}
    for p, a, b in zip(problems, nll.tolist(), counts.tolist()):
        x = acc.setdefault(p.domain, [0.0, 0])
        x[0] += a
        x[1] += b
    return {d: (v[0], int(v[1])) for d, v in sorted(acc.items())}


def _reference(
    lm: MixtureLM, names: Sequence[str], heldout: Sequence[Problem], enc_held: list[tuple[list[int], list[int]]]
) -> dict[str, Any]:
    """The held-out chains under the uniform mixture, the best single member and the bare base."""
    held_nll, held_count = member_nll(lm, enc_held)
    m = len(names)
    members = {name: _per_domain(heldout, held_nll[:, i], held_count) for i, name in enumerate(names)}
    best = min(names, key=lambda n: balanced_log_ppl(members[n]))
    uniform = domain_nll(lm, heldout, torch.full((len(heldout), m), 1.0 / m), encoded=enc_held)
    base = domain_nll(lm, heldout, torch.zeros(len(heldout), m), encoded=enc_held)
    return {
        "uniform": _domain_summary(uniform),
        "best_member": {"name": best, **_domain_summary(members[best])},
        "base": _domain_summary(base),
        "members": {n: balanced_log_ppl(v) for n, v in members.items()},
    }


def _domain_summary(per_domain: Mapping[str, tuple[float, int]]) -> dict[str, Any]:
    return {
        "balanced_log_ppl": balanced_log_ppl(per_domain),
        "per_domain": {d: nll / tokens for d, (nll, tokens) in per_domain.items()},
        "tokens": {d: tokens for d, (_, tokens) in per_domain.items()},
    }
