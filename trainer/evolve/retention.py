"""What members keep through self-play: validation figures per family, per-member replay, frozen
teachers and the forgetting guard.

Self-play with peer labels erased the specialists' edge (BENCHMARKS sections 10 and 13): every
member trained on every family and forgot its own. The levers here, each behind its own switch
(:class:`RetentionConfig`, the ``retention`` section of the evolve config):

* **validation figures** (:class:`Validation`): greedy chains of each member on its own family's
  validation problems (every family for a member without a ``focus_domain``: a branched
  population's shared seed, the general expert). The problems come from the sandbox's held-out
  split with their own seed, minus every prompt of the run's held-out test set, so nothing here
  selects on the figures the run reports; a dataset run names a labelled file (``retention.data``);
* **replay** (:func:`replay_examples`): each member's gradient phase also sees ``replay`` examples
  of its own warm-up distribution (its focus family at its focus levels and, for a shard cut, its
  shard; worked chains), the data the population was built from, drawn afresh each generation
  from ``(seed, generation, member)``. The self-play problems' answers stay hidden;
* **frozen teachers** (:func:`choose_teachers`): each family's best member on the validation
  problems (among the members whose ``focus_domain`` it is, when there are any) labels that
  family's problems with the majority of its own chains and does not train this generation; the
  others learn from its labels (``labels: hidden`` only);
* **the forgetting guard** (:meth:`Validation.guard`): after the gradient phase, every member that
  trained is evaluated again on the same problems, from its new weights staged in a scratch
  population; one that lost more than ``max_drop`` of its own family's accuracy goes back to its
  weights of the generation before, and the history line says who, with both figures.

Greedy chains are deterministic on one engine, so a figure moves only when the weights do; a
single problem is worth 1 / (per_level x levels) of a specialist's figure, which is the guard's
resolution (``per_level`` 16 over 4 levels: 1.6 points, under the default 2-point threshold).
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from ensemble_serve.shared.lora import LoraWeights, save_lora
from ensemble_serve.shared.population import Member, Population
from trainer.evolve.seeds import derive_seed
from trainer.scoring import greedy_chains, is_right, share
from trainer.settings import FrozenConfig
from trainer.tasks.sandbox import Problem, generate_problems, in_shard, iter_problems, load_jsonl

VALIDATION_MAX_TOKENS = 160
"""Generation limit of the validation chains (the held-out evaluation's)."""


class RetentionConfig(FrozenConfig):
    """The ``retention`` section of the evolve config: what members keep (all off by default)."""

    replay: int = Field(
        0,
        ge=0,
        description="Examples of each member's own warm-up distribution (its focus family and levels, worked "
        "chains) added to its gradient phase every generation (0: none).",
    )
    teachers: bool = Field(
        False,
        description="Frozen teachers: each family's best member on the validation problems labels that family's "
        "problems with its own chains' majority and does not train that generation (needs labels: hidden).",
    )
    guard: bool = Field(
        False,
        description="Forgetting guard: a member that lost more than `max_drop` on its own family's validation "
        "problems in the gradient phase is rolled back to its weights of the generation before (recorded).",
    )
    max_drop: float = Field(
        0.02, ge=0, lt=1, allow_inf_nan=False, description="The guard's threshold, as a share (0.02: 2 points)."
    )
    per_level: int = Field(16, ge=1, description="Validation problems per family and level (sandbox).")
    seed: int = Field(4321, description="Seed of the validation problems (fixed over the run).")
    data: Path | None = Field(
        None,
        description="A labelled JSONL file of validation problems (prompt, answer, domain), for runs on a dataset "
        "(the guard and teachers need labelled problems that are not the held-out test set).",
    )

    @property
    def validates(self) -> bool:
        """Whether anything needs the validation figures."""
        return self.guard or self.teachers


def validation_problems(
    cfg: RetentionConfig,
    domains: Sequence[str],
    difficulties: Sequence[int],
    heldout: Sequence[Problem],
) -> list[Problem]:
    """The validation problems: the labelled file, or `per_level` per (family, level) of the sandbox's
    held-out split drawn with the retention seed; prompts of the held-out test set are left out."""
    if cfg.data is not None:
        problems = [p for p in load_jsonl(cfg.data) if p.answer is not None]
        if not problems:
            raise ValueError(f"{cfg.data}: no rows with an `answer` to validate against")
    else:
        n = cfg.per_level * len(domains) * len(difficulties)
        problems = generate_problems(
            n, seed=cfg.seed, split="heldout", domains=list(domains), difficulties=list(difficulties)
        )
    test = {p.prompt for p in heldout}
    return [p for p in problems if p.prompt not in test]


def own_problems(problems: Sequence[Problem], focus: str | None) -> list[int]:
    """Indices of a member's own family's problems (every problem for a member without a focus domain)."""
    return [i for i, p in enumerate(problems) if focus is None or p.domain == focus]


def focus_of(member: Member) -> str | None:
    return member.info.get("focus_domain")


def stage(pop: Population, weights: Mapping[str, LoraWeights], folder: Path) -> Population:
    """A scratch population in `folder` holding `weights` (for the engine only): a member of `pop` keeps its
    manifest entry, another name (a control adapter) gets one from its weights."""
    members = []
    known = {m.name: m for m in pop.manifest.members}
    for name, w in weights.items():
        save_lora(w, folder / "members" / name)
        entry = known.get(name) or Member(name=name, path=f"members/{name}", rank=w.rank, alpha=w.alpha)
        members.append(entry.model_copy(update={"path": f"members/{name}", "rank": w.rank, "alpha": w.alpha}))
    manifest = pop.manifest.model_copy(update={"members": members})
    return Population(root=folder, manifest=manifest, base_model_path=pop.base_model_path)


class Validation:
    """The validation problems of a run, and the figures, teachers and guard that read them."""

    def __init__(self, cfg: RetentionConfig, problems: Sequence[Problem], answer: str):
        if not problems:
            raise ValueError("retention: no validation problems are left (all of them are in the held-out test set)")
        self.cfg = cfg
        self.problems = list(problems)
        self.answer = answer

    def figures(self, engine: Any, pop: Population) -> dict[str, dict[str, float]]:
        """``{member: {family: accuracy, ..., "all": own figure}}`` of `pop`'s members on their own families'
        validation problems, in one batch on `engine` (synced here to `pop`). "all" is the guard's figure."""
        engine.sync(pop)
        members = list(pop.manifest.members)
        pairs = [(m.name, i) for m in members for i in own_problems(self.problems, focus_of(m))]
        chains = greedy_chains(engine, pairs, self.problems, VALIDATION_MAX_TOKENS, self.answer)
        right: dict[str, list[tuple[str, bool]]] = {m.name: [] for m in members}
        for (m, i), chain in zip(pairs, chains):
            right[m].append((self.problems[i].domain, is_right(self.problems[i], chain)))
        out = {}
        for m, rows in right.items():
            fams = sorted({d for d, _ in rows})
            out[m] = {d: share([ok for dd, ok in rows if dd == d]) for d in fams}
            out[m]["all"] = share([ok for _, ok in rows])
        return out

    def guard(
        self,
        engine: Any,
        pop: Population,
        before: Mapping[str, Mapping[str, float]],
        weights: Mapping[str, LoraWeights],
        trained: Mapping[str, LoraWeights],
    ) -> tuple[dict[str, LoraWeights], dict[str, Any]]:
        """Roll back every member whose own figure fell by more than `max_drop` in the gradient phase.

        `before`: :meth:`figures` of the generation's members; `weights`: their weights then; `trained`: after
        the gradient phase (the same object where a member did not train). Returns the weights to go on with
        and the history line's ``guard`` entry."""
        changed = {m: w for m, w in trained.items() if w is not weights[m]}
        after: dict[str, dict[str, float]] = {}
        if changed:
            with tempfile.TemporaryDirectory(prefix="ensemble-guard-") as work:
                after = self.figures(engine, stage(pop, changed, Path(work)))
        rolled = [m for m in pop.names if m in after and before[m]["all"] - after[m]["all"] > self.cfg.max_drop + 1e-9]
        kept = {m: (weights[m] if m in rolled else trained[m]) for m in pop.names}
        entry = {
            "max_drop": self.cfg.max_drop,
            "members": {
                m: {"before": before[m]["all"], **({"after": after[m]["all"]} if m in after else {"trained": False})}
                for m in pop.names
            },
            "rolled_back": rolled,
        }
        return kept, entry


def choose_teachers(pop: Population, figures: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """``{family: teacher}``: per family, the member with the best validation figure on it among the members
    whose focus domain it is (every member with a figure there when none is); the first in manifest order
    on ties."""
    families = sorted({d for f in figures.values() for d in f if d != "all"})
    teachers = {}
    for d in families:
        niche = [m.name for m in pop.manifest.members if focus_of(m) == d and d in figures[m.name]]
        pool = niche or [m for m in pop.names if d in figures[m]]
        teachers[d] = max(pool, key=lambda m: figures[m][d])  # max keeps the first of equals
    return teachers


def retained_examples(
    examples: Mapping[str, list[tuple[str, str]]],
    pop: Population,
    teachers: Mapping[str, str],
    cfg: RetentionConfig,
    run: Any,
    generation: int,
    dataset: Sequence[Problem] | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Each member's training examples: its verified chains plus its replay (:func:`replay_examples`), and
    none for a frozen teacher. `run`: the evolve config (its seed, domains and difficulties)."""
    out = {}
    for m in pop.manifest.members:
        if m.name in teachers.values():
            out[m.name] = []
            continue
        replay = replay_examples(m, cfg.replay, run.seed, generation, run.domains, run.difficulties, dataset)
        out[m.name] = list(examples[m.name]) + replay
    return out


def replay_examples(
    member: Member,
    n: int,
    seed: int,
    generation: int,
    domains: Sequence[str],
    difficulties: Sequence[int],
    dataset: Sequence[Problem] | None = None,
) -> list[tuple[str, str]]:
    """`n` (prompt, worked chain) examples of `member`'s own warm-up distribution for `generation`.

    Sandbox: its focus family (every family without one) at its focus levels (the run's levels when the
    manifest records none), of its shard when it was cut by shard, from the training split. Dataset: the
    rows with a chain of its focus family (every row with a chain without one)."""
    if n <= 0:
        return []
    focus = focus_of(member)
    rng_seed = derive_seed(seed, "replay", generation, member.name)
    if dataset is not None:
        rows = [p for p in dataset if p.chain and (focus is None or p.domain == focus)]
        if not rows:
            return []
        rng = random.Random(rng_seed)
        return [(p.prompt, p.chain) for p in (rng.choice(rows) for _ in range(n))]
    levels = [lv for lv in member.info.get("focus_difficulties") or difficulties]
    shard = member.info.get("shard")
    stream = iter_problems(
        seed=rng_seed, split="train", domains=[focus] if focus else list(domains), difficulties=levels
    )
    out: list[tuple[str, str]] = []
    for p in itertools.islice(stream, 200 * n):  # bounded: a slice without worked chains gives what it has
        if not p.chain or (shard is not None and not in_shard(p.prompt, *shard)):
            continue
        out.append((p.prompt, p.chain))
        if len(out) == n:
            return out
    return out
