"""`ensemble-train calibrate`: each member's accuracy per domain, written as the population's reliability table.

Every member answers the calibration problems greedily, all in one multi-LoRA batch (the server's
engine layer). Then:

- with labels (`labels: ground_truth`): p = (right + 1) / (n + 2) per member and domain;
- without (`labels: hidden`): the answers are removed before anything else happens, and p comes
  from who agrees with whom (`agreement.fit_one_coin`, a one-coin Dawid-Skene model per domain).

When the problems have answers, the report also gives the estimate the table did not use and how far
the label-free estimates are from the labelled ones (mean absolute difference, correlation), and the
accuracy a `calibrated` vote would reach with each, on these problems. The table also holds each
domain's centroid of base-model features, so the server can tell a prompt's domain.

Writes `reliability.json` (atomically) and then the manifest's `reliability` entry; a server watching
the directory picks it up.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ensemble_serve.shared.engine_config import EngineConfig
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.population import Population, load_population, read_manifest, write_manifest
from ensemble_serve.shared.population.reliability import (
    Estimate,
    Method,
    ReliabilityTable,
    smoothed,
    table_entry,
    write_reliability,
)
from ensemble_serve.shared.router import (
    DEFAULT_FEATURE,
    ROUTER_DIR,
    Router,
    RouterError,
    RouterFeatures,
    load_population_router,
)
from ensemble_serve.shared.voting import Candidate
from trainer.calibration import routing
from trainer.calibration.agreement import fit_one_coin
from trainer.router.command import install_router
from trainer.scoring import greedy_answers, is_right
from trainer.settings import ALL_DOMAINS, FrozenConfig, RemoteSettings, check_difficulties, check_domains
from trainer.tasks.sandbox import Problem, generate_problems, load_jsonl

ALL = "all"


class CalibrateConfig(FrozenConfig, RemoteSettings):
    """`ensemble-train calibrate`: the reliability table of a population."""

    population: Path = Field(Path("runs/population"), description="Population directory to calibrate.")
    labels: Literal["ground_truth", "hidden"] = Field(
        "ground_truth",
        description="ground_truth: p from checked answers; hidden: answers removed, p from agreement alone.",
    )
    data: Path | None = Field(
        None, description="A JSONL dataset (prompt, optional answer, domain) instead of the sandbox."
    )
    per_domain: int = Field(48, ge=1, description="Held-out sandbox problems per domain.")
    seed: int = Field(4321, description="Seed of the calibration problems (keep it apart from evaluation seeds).")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Sandbox domains.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Sandbox levels.")
    centroids: bool = Field(True, description="Store each domain's centroid of base-model features (domain lookup).")
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    routing_generations: int = Field(
        0,
        ge=0,
        description="Routing-only evolution (labels: ground_truth): evolve the table for this many generations "
        "so the calibrated vote is right most often on half of the problems, the members frozen; the table is "
        "kept only if its vote beats the labelled table's on the other half (0: off).",
    )
    routing_gates: bool = Field(
        False,
        description="With routing_generations: the router's per-member offsets (its logits' bias, which decide "
        "each prompt's top-k) evolve with the table, and fitness is the routed calibrated vote of the default "
        "request's k members; the router is rewritten with them when the table is kept. Needs a router.",
    )
    routing_population: int = Field(12, ge=4, description="Tables per generation of the routing evolution.")
    routing_sigma: float = Field(
        0.5, gt=0, le=5, allow_inf_nan=False, description="Mutation step of the routing evolution (logits)."
    )
    dry_run: bool = Field(False, description="Report only; do not write the table.")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vLLM memory fraction.")

    _domains = field_validator("domains")(check_domains)
    _diffs = field_validator("difficulties")(check_difficulties)

    @model_validator(mode="after")
    def _routing_needs_labels(self) -> CalibrateConfig:
        if self.routing_generations and self.labels != "ground_truth":
            raise ValueError(
                "routing_generations evolves the table against checked answers: it needs labels: ground_truth"
            )
        if self.routing_gates and not self.routing_generations:
            raise ValueError("routing_gates evolves the router's offsets with the table: set routing_generations too")
        return self


def calibration_problems(cfg: CalibrateConfig) -> list[Problem]:
    """The problems (answers removed with hidden labels: nothing downstream can read them)."""
    if cfg.data is not None:
        problems = load_jsonl(cfg.data)
    else:
        n = cfg.per_domain * len(cfg.domains) * len(cfg.difficulties)
        problems = generate_problems(
            n, cfg.seed, split="heldout", domains=list(cfg.domains), difficulties=list(cfg.difficulties)
        )
    if not problems:
        raise ValueError("no calibration problems")
    return problems


def labelled_estimates(
    problems: Sequence[Problem], cands: dict[str, list[Candidate]]
) -> tuple[dict[str, dict[str, Estimate]], dict[str, Estimate]]:
    """(domain -> member -> estimate, member -> overall estimate) from answers checked against labels."""
    right: dict[tuple[str, str], int] = defaultdict(int)
    count: dict[tuple[str, str], int] = defaultdict(int)
    for member, row in cands.items():
        for p, c in zip(problems, row):
            for d in (p.domain, ALL):
                count[member, d] += 1
                right[member, d] += is_right(p, c)
    return _as_tables(cands, problems, lambda m, d: smoothed(right[m, d], count[m, d]), count)


def agreement_estimates(
    problems: Sequence[Problem], cands: dict[str, list[Candidate]]
) -> tuple[dict[str, dict[str, Estimate]], dict[str, Estimate]]:
    """The same from agreement alone: a one-coin Dawid-Skene fit per domain (answers never read)."""
    members = list(cands)
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        by_domain[p.domain].append(i)
    expected_right: dict[tuple[str, str], float] = defaultdict(float)
    count: dict[tuple[str, str], int] = defaultdict(int)
    p_of: dict[tuple[str, str], float] = {}
    for domain, idx in by_domain.items():
        items = [{m: cands[m][i].answer for m in members} for i in idx]
        fit = fit_one_coin(items, members)
        for m in members:
            p_of[m, domain] = fit.accuracy[m]
            for item, post in zip(items, fit.posteriors):
                if item[m] is not None:
                    expected_right[m, ALL] += post.get(item[m], 0.0)
            count[m, domain] = len(idx)
            count[m, ALL] += len(idx)
    for m in members:
        p_of[m, ALL] = smoothed(expected_right[m, ALL], count[m, ALL])
    return _as_tables(cands, problems, lambda m, d: p_of[m, d], count)


def _as_tables(cands: dict, problems: Sequence[Problem], p_of: Any, count: dict) -> tuple[dict, dict]:
    domains = sorted({p.domain for p in problems})
    per_domain = {d: {m: Estimate(p=round(p_of(m, d), 6), n=count[m, d]) for m in cands} for d in domains}
    overall = {m: Estimate(p=round(p_of(m, ALL), 6), n=count[m, ALL]) for m in cands}
    return per_domain, overall


def domain_centroids(base: Path, problems: Sequence[Problem], feature: str) -> dict[str, list[float]]:
    """Each domain's mean base-model feature of its prompts (the server finds a prompt's nearest)."""
    extractor = RouterFeatures(base)
    feats = extractor([p.prompt for p in problems], feature).double().numpy()
    out = {}
    for domain in sorted({p.domain for p in problems}):
        rows = [i for i, p in enumerate(problems) if p.domain == domain]
        out[domain] = [round(float(x), 6) for x in feats[rows].mean(axis=0)]
    return out


def gate_choice(population: Population, problems: Sequence[Problem]) -> tuple[routing.GateChoice, Router]:
    """The population's router on these problems (logits computed once) and the default request's k.

    k is the population's default ``members``, else the router entry's ``top_k``. Refused (ValueError):
    no router, one that does not load for this population, no base model folder, k of every member."""
    entry = population.manifest.router
    if not entry:
        raise ValueError(
            "routing_gates evolves the population's router, and this population has none "
            "(train one with `ensemble-train router`)"
        )
    if population.base_model_path is None:
        raise ValueError("routing_gates needs the base model's folder (the router's features)")
    try:
        router = load_population_router(population)
    except RouterError as e:
        raise ValueError(f"routing_gates: the population's router cannot be used: {e}") from None
    k = (population.manifest.ensemble_defaults or {}).get("members") or entry.get("top_k")
    if isinstance(k, list):
        raise ValueError(
            "routing_gates: the population's default request names its members, so the router chooses none; "
            "set a count instead (`ensemble-serve defaults DIR --set '{\"members\": K}'`)"
        )
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(
            "routing_gates: neither the population's default request nor its router says how many members a "
            "routed request asks (set it with `ensemble-serve defaults DIR --set '{\"members\": K}'`)"
        )
    features = RouterFeatures(population.base_model_path)([p.prompt for p in problems], router.feature)
    with torch.inference_mode():
        logits = router.logits(features).double().numpy()

    def gates(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return router.gates_from_logits(torch.from_numpy(x).to(router.out.weight.dtype)).double().numpy()

    return routing.GateChoice(logits=logits, gates=gates, k=k), router


def with_offsets(router: Router, offsets: Sequence[float]) -> Router:
    """The router with `offsets` added to its output layer's bias (its logits), the rest unchanged."""
    with torch.no_grad():
        router.out.bias += torch.tensor(list(offsets), dtype=router.out.bias.dtype)
    return router


def vote_accuracy(problems: Sequence[Problem], cands: dict[str, list[Candidate]], per_domain: dict) -> float | None:
    """Accuracy of a `calibrated` vote of every member on these problems, with the given estimates."""
    if any(p.answer is None for p in problems):
        return None
    p = {d: {m: e.p for m, e in row.items()} for d, row in per_domain.items()}
    return routing.vote_accuracy(problems, cands, p, range(len(problems)))


def compare(labelled: dict, agreement: dict) -> dict[str, float]:
    """How close the label-free estimates come to the labelled ones (every member x domain)."""
    pairs = [(labelled[d][m].p, agreement[d][m].p) for d in labelled for m in labelled[d]]
    a, b = np.array(pairs).T
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan
    return {"mean_abs_difference": round(float(np.abs(a - b).mean()), 4), "correlation": round(corr, 4)}


def run_calibrate(cfg: CalibrateConfig, engine: OfflineEngine | None = None) -> dict[str, Any]:
    """The reliability table of `cfg.population` (written unless `cfg.dry_run`) and the report.

    ``engine``: an :class:`OfflineEngine` on the population's base model to use instead of starting
    one (checked, synced to this population and left running).
    """
    population = load_population(cfg.population)
    problems = calibration_problems(cfg)
    if cfg.labels == "hidden":
        problems = [Problem(p.prompt, None, None, p.domain, p.difficulty) for p in problems]
    elif any(p.answer is None for p in problems):
        raise ValueError("labels: ground_truth needs an answer on every problem (or use labels: hidden)")
    gates, router = gate_choice(population, problems) if cfg.routing_gates else (None, None)  # before the engine
    ecfg = EngineConfig(gpu_memory_utilization=cfg.gpu_memory_utilization)
    answers = greedy_answers(population, population.names, problems, cfg.max_tokens, ecfg, engine=engine, remote=cfg)
    cands: dict[str, list[Candidate]] = {m: row for m, row in answers.items() if m is not None}
    method: Method = "labelled" if cfg.labels == "ground_truth" else "agreement"
    estimates = {"agreement": agreement_estimates(problems, cands)}
    if method == "labelled":
        estimates["labelled"] = labelled_estimates(problems, cands)
    per_domain, overall = estimates[method]
    routed = None
    if cfg.routing_generations:
        start = {d: {m: e.p for m, e in row.items()} for d, row in per_domain.items()}
        routed = routing.evolve_routing(
            problems,
            cands,
            start,
            cfg.routing_generations,
            cfg.routing_population,
            cfg.routing_sigma,
            cfg.seed,
            progress=True,
            router=gates,
        )
        if routed.kept:
            method = "evolved"
            per_domain = {
                d: {m: Estimate(p=routed.p[d][m], n=e.n) for m, e in row.items()} for d, row in per_domain.items()
            }
    feature = DEFAULT_FEATURE["sigmoid_floor"]
    centroids = None
    if cfg.centroids and population.base_model_path is not None:
        centroids = domain_centroids(population.base_model_path, problems, feature)
    table = ReliabilityTable(
        base_model=population.manifest.base_model.name,
        members=list(population.names),
        method=method,
        domains=per_domain,
        overall=overall,
        feature=feature if centroids else None,
        centroids=centroids,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    report: dict[str, Any] = {
        "problems": len(problems),
        "method": method,
        "table": table.model_dump(exclude={"centroids"}),
    }
    if "labelled" in estimates:
        report["agreement_vs_labelled"] = compare(estimates["labelled"][0], estimates["agreement"][0])
        report["calibrated_vote_accuracy"] = {
            name: vote_accuracy(problems, cands, tables[0]) for name, tables in estimates.items()
        }
    if routed is not None:
        report["routing"] = {
            "generations": cfg.routing_generations,
            "fit_accuracy": routed.fit_accuracy,
            "check_accuracy": routed.check_accuracy,
            "best_per_generation": routed.best_per_generation,
            "kept": routed.kept,
        }
        if gates is not None:
            report["routing"]["gates"] = {"k": gates.k, "offsets": dict(zip(cands, routed.offsets or [], strict=True))}
    if not cfg.dry_run:
        if router is not None and routed is not None and routed.kept:
            # the router first: if it cannot be written, neither is the table (both stay as they were)
            entry = dict(population.manifest.router or {})
            entry["evolved"] = {
                "generations": cfg.routing_generations,
                "k": gates.k,
                "check_accuracy": routed.check_accuracy,
            }
            install_router(population.root, with_offsets(router, routed.offsets or []), entry)
            report["router_written"] = str(Path(population.root) / ROUTER_DIR)
        write_reliability(population.root, table)
        manifest = read_manifest(population.root)
        write_manifest(population.root, manifest.model_copy(update={"reliability": table_entry(table)}))
        report["written"] = str(Path(population.root) / "reliability.json")
    return report


def format_report(report: dict[str, Any]) -> str:
    table = report["table"]
    members = table["members"]
    lines = [f"reliability ({report['method']}, {report['problems']} problems): p per member and domain"]
    lines.append(f"{'domain':<10}" + "".join(f"{m:>8}" for m in members))
    for domain, row in sorted(table["domains"].items()) + [("all", table["overall"])]:
        lines.append(f"{domain:<10}" + "".join(f"{row[m]['p']:>8.3f}" for m in members))
    if "agreement_vs_labelled" in report:
        cmp = report["agreement_vs_labelled"]
        lines.append(
            f"label-free vs labelled: mean |difference| {cmp['mean_abs_difference']}, correlation {cmp['correlation']}"
        )
        acc = report["calibrated_vote_accuracy"]
        lines.append("calibrated vote accuracy here: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    if "routing" in report:
        r = report["routing"]
        verdict = (
            "kept" if r["kept"] else "not kept (the labelled table's vote is as good where the search did not look)"
        )
        lines.append(
            f"routing evolution ({r['generations']} generations): vote on the fit half {r['fit_accuracy']['start']:.3f} "
            f"-> {r['fit_accuracy']['evolved']:.3f}, on the check half {r['check_accuracy']['start']:.3f} -> "
            f"{r['check_accuracy']['evolved']:.3f}: {verdict}"
        )
        if "gates" in r:
            offsets = ", ".join(f"{m} {v:+.2f}" for m, v in r["gates"]["offsets"].items())
            lines.append(f"  routed vote of the top {r['gates']['k']}; the router's evolved offsets: {offsets}")
    if "router_written" in report:
        lines.append(f"wrote the router with its evolved offsets into {report['router_written']}")
    if "written" in report:
        lines.append(f"wrote {report['written']} and the manifest's reliability entry")
    return "\n".join(lines)
