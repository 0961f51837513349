"""`ensemble-train evolve`: the run's config, with its evolution, curriculum and lifecycle sections.

Names that pick code are checked against the registries that hold the code, when the config is
read: fitness terms and scopes (:mod:`trainer.evolve.fitness`), operators and rank policies
(:mod:`trainer.evolve.operators`). The lifecycle section's settings live beside the lifecycle's
code (:class:`trainer.evolve.lifecycle.LifecycleConfig`, as PEFT keeps a tuner's config beside its
tuner), checked against its reallocation registry. A typo is
refused, listing the names that exist, before any model is loaded. Importing those registries
brings in torch, so `--help` pays for it too; every command imports torch right after anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ensemble_serve.shared.voting.answers import MODES
from trainer.evolve import operators
from trainer.evolve.fitness import FITNESS_TERMS, Scope
from trainer.evolve.lifecycle import LifecycleConfig
from trainer.evolve.retention import RetentionConfig
from trainer.settings import (
    ALL_DOMAINS,
    FrozenConfig,
    RemoteSettings,
    alternatives,
    check_difficulties,
    check_domains,
    one_of,
)


class EvolutionConfig(FrozenConfig):
    """The evolutionary step: which operators run, with what settings (names from :mod:`trainer.evolve.operators`).

    An operator name the registry does not know, or a `rank_policy` it has no rule for, is refused
    when the config is read, with the names that exist; so are `selection_options` the selection
    rule does not take (its option model, :data:`trainer.evolve.operators.SELECTION_OPTIONS`).
    """

    enabled: bool = Field(True, description="Run selection/crossover/mutation/replacement (off: gradient phase only).")
    elite: int = Field(2, ge=0, description="Fittest members carried over unchanged by the evolutionary step.")
    offspring: int = Field(
        2, ge=0, description="Children made each generation; they replace members chosen by `replacement`."
    )
    selection: str = Field("tournament", description=f"Parent selection: {alternatives(operators.SELECTION)}.")
    selection_options: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Options of the selection rule, checked against its model when the config is read: "
        f"{operators.selection_options_help()}.",
    )
    crossover: str = Field(
        "weighted_average", description=f"Crossover: {alternatives([*operators.CROSSOVER, operators.SKIP])}."
    )
    rank_policy: str = Field(
        "error",
        description="When parents' ranks differ and the crossover needs equal ranks: "
        f"{alternatives(operators.RANK_POLICIES)}.",
    )
    child_rank: int | None = Field(
        None, ge=1, le=64, description="Rank of every child (default: the rank of its fitter parent)."
    )
    mutation: str = Field(
        "gaussian", description=f"Mutation of children: {alternatives([*operators.MUTATION, operators.SKIP])}."
    )
    mutation_strength: float = Field(
        0.05, ge=0, description="Mutation strength (noise scale, drop rate, or SVD sigma)."
    )
    replacement: str = Field("weakest", description=f"Who the children replace: {alternatives(operators.REPLACEMENT)}.")

    _rank_policy = field_validator("rank_policy")(one_of("rank_policy", operators.RANK_POLICIES))

    @field_validator("selection", "crossover", "mutation", "replacement")
    @classmethod
    def _operator(cls, v: str, info: ValidationInfo) -> str:
        return operators.check_setting(info.field_name, v)

    @field_validator("selection_options")
    @classmethod
    def _selection_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        rule = info.data.get("selection")  # absent when the rule itself was refused: that error says it
        return v if rule is None else operators.check_selection_options(rule, v)


class BackoffConfig(FrozenConfig):
    """When the curriculum steps back a level: label-free signs that its labels went bad.

    Each practised cell's self-play chains give three signals that need no answer: the mean
    agreement (share of chains with the majority answer), the mean margin (majority share minus
    the runner-up's) and the mean chain length. A cell whose signal moves past its limit between
    two generations at the same level makes its domain step back one level and wait `cooldown`
    generations before climbing again.
    """

    agreement_drop: float = Field(
        0.15,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Back off when a cell's mean agreement falls by more than this.",
    )
    margin_drop: float = Field(
        0.2,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Back off when a cell's mean consensus margin falls by more than this.",
    )
    length_drift: float = Field(
        0.5,
        gt=0,
        allow_inf_nan=False,
        description="Back off when a cell's mean chain length changes by more than this fraction.",
    )
    cooldown: int = Field(2, ge=0, description="Generations a domain that backed off waits before climbing again.")


class CurriculumConfig(FrozenConfig):
    """The curriculum: what each generation practises (names from :mod:`trainer.evolve.curriculum`).

    Each generation the proposer probes candidate cells with a few problems (one chain per member)
    and practises those whose score lies strictly between `low` and `high`: the labelling members'
    consensus solve rate with labels, their mean agreement with labels hidden (answers are never
    read then).
    """

    enabled: bool = Field(False, description="Choose each generation's problems with the proposer (off: a fixed mix).")
    proposer: str = Field("frontier", description="The proposer (see trainer.evolve.curriculum.PROPOSERS).")
    low: float = Field(0.2, ge=0, le=1, allow_inf_nan=False, description="A cell scoring at or below this is too hard.")
    high: float = Field(
        0.8, ge=0, le=1, allow_inf_nan=False, description="A cell scoring at or above this is mastered."
    )
    probe_problems: int = Field(
        4,
        ge=1,
        le=64,
        description="Problems per probed cell (frontier) or pool rows per practised problem (agreement).",
    )
    replay: float = Field(
        0.2,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="Share of each batch drawn from mastered levels below the frontier.",
    )
    start_level: int | None = Field(
        None,
        description="Every domain's first frontier level (default: the level above the base model's "
        "`trained_difficulties`, else the lowest of `difficulties`).",
    )
    backoff: BackoffConfig = Field(default_factory=BackoffConfig, description="Label-free back-off.")

    @field_validator("proposer")
    @classmethod
    def _proposer(cls, v: str) -> str:
        from trainer.evolve.curriculum import PROPOSERS

        return one_of("proposer", PROPOSERS)(v)

    @model_validator(mode="after")
    def _bounds(self) -> CurriculumConfig:
        if not self.low < self.high:
            raise ValueError(
                f"curriculum bounds leave nothing learnable: low ({self.low}) must be below high ({self.high})"
            )
        return self


class EvolveConfig(FrozenConfig, RemoteSettings):
    """`ensemble-train evolve`: population self-play (generate, score, train, evolve, commit)."""

    population: Path = Field(Path("runs/population"), description="Population directory to evolve (in place).")
    out: Path | None = Field(
        None, description="Copy the population here first and evolve the copy (the original stays as it is)."
    )
    members: tuple[str, ...] | None = Field(
        None, description="With --out: start from these members only (e.g. one member for a single-agent control)."
    )
    generations: int = Field(4, ge=1, description="Generations to run.")
    seed: int = Field(0, description="Seed of the run: problems, sampling, training and operators derive from it.")
    labels: str = Field(
        "ground_truth",
        description="ground_truth: verify chains against answers; hidden: never read answers during training "
        "(pseudo-labels come from the population's consensus).",
    )
    data: Path | None = Field(
        None, description="A JSONL dataset (prompt, optional answer, optional domain) instead of the sandbox."
    )
    skip_invalid: bool = Field(
        False, description="Skip malformed dataset lines (reported) instead of refusing the file."
    )
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Sandbox domains.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Sandbox difficulty levels.")
    problems_per_generation: int = Field(48, ge=1, description="Fresh problems each generation.")
    samples_per_member: int = Field(1, ge=1, le=64, description="Chains each member samples per problem.")
    temperature: float = Field(
        0.8, ge=0, le=2, allow_inf_nan=False, description="Sampling temperature of the self-play chains (vLLM: 0-2)."
    )
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    answer: str = Field(
        "auto",
        description=f"Answer extractor for chains (as the server's `answer` option): {alternatives(MODES)}.",
    )
    fitness: dict[str, float] = Field(
        default_factory=lambda: {
            "correctness": 1.0,
            "consensus": 0.0,
            "cross_eval": 0.1,
            "diversity_embedding": 0.05,
            "diversity_output": 0.05,
            "contribution": 0.2,
        },
        description=f"Weight of each fitness term ({', '.join(FITNESS_TERMS)}).",
    )
    probe_chains: int = Field(
        16, ge=1, description="Chains used to compare members' hidden states and output distributions."
    )
    cross_eval_chains: int = Field(
        8, ge=1, description="Problems whose chains every member scores by likelihood (cross-evaluation)."
    )
    min_agreement: float = Field(
        0.5, ge=0, le=1, description="With hidden labels: a consensus answer is a pseudo-label only at this agreement."
    )
    train_steps: int = Field(12, ge=0, description="Gradient steps per member per generation (0: no gradient phase).")
    train_batch_size: int = Field(16, gt=0, description="Batch size of the gradient phase.")
    train_epochs: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="At most this many passes over a member's examples per generation (steps = min(train_steps, "
        "ceil(epochs x examples / batch)); None: always train_steps). Few self-labelled examples are not "
        "worth many passes.",
    )
    train_lr: float | None = Field(
        None, gt=0, description="Learning rate of the gradient phase (default: each member's own warm-up lr)."
    )
    share_chains: Literal["niche", "experts"] | bool = Field(
        True,
        description="Members also learn from other members' verified chains: true (all of them), false (none), "
        "niche (a member with a `focus_domain` learns only that domain, from its own and its niche peers' "
        "chains; a member without one learns from every chain) or experts (every member learns each family "
        "from its own chains and those of the members whose `focus_domain` it is).",
    )
    label_rule: Literal["consensus", "leave_self_out"] = Field(
        "consensus",
        description="With labels hidden: consensus (the majority of every chain) or leave_self_out (a member's "
        "chains are checked against the majority of the OTHER members' chains).",
    )
    label_peers: Literal["all", "niche", "routed"] = Field(
        "all",
        description="Whose chains label a problem (and score the curriculum's cells): all members, niche (the "
        "members whose `focus_domain` is the problem's domain, when it has any; all members otherwise), or routed "
        "(the members the population's router sends the prompt to, its top `label_top_k`: the routed ensemble's "
        "consensus teaches; needs a router).",
    )
    label_top_k: int | None = Field(
        None,
        ge=1,
        description="With label_peers routed: how many routed members label a problem (None: the population's "
        "default request's `members`, else the router's top_k, else 2).",
    )
    max_length_ratio: float | None = Field(
        None,
        gt=1,
        allow_inf_nan=False,
        description="Length filter of training chains: drop chains longer than this times the median length of "
        "the chains that reach the same label, and chains cut off at `max_tokens` (None: no filter).",
    )
    niche: bool = Field(
        False,
        description="Niche-aware selection: the fittest member of each `focus_domain` is kept like an elite, a "
        "child's parents come from the niche of the slot it takes, and it takes that focus domain.",
    )
    curriculum: CurriculumConfig = Field(
        default_factory=CurriculumConfig, description="Frontier curriculum (off by default)."
    )
    evolution: EvolutionConfig = Field(default_factory=EvolutionConfig, description="The evolutionary step.")
    lifecycle: LifecycleConfig = Field(
        default_factory=LifecycleConfig,
        description="The adapter lifecycle after the evolutionary step (off by default).",
    )
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig,
        description="What members keep through self-play: replay of their own data, frozen teachers, the "
        "forgetting guard (off by default; trainer.evolve.retention).",
    )
    control: Path | None = Field(
        None,
        description="A PEFT adapter on the same base trained beside the population as a compute-matched control: "
        "each generation on the union of the members' training examples for the sum of their gradient steps; it "
        "never labels, votes or evolves, and is evaluated on the held-out problems (trainer.evolve.control).",
    )
    fitness_scope: Scope = Field(
        "global",
        description="Scope of the per-problem fitness terms (correctness, consensus): global (all problems) or "
        "domain_loo (mean over domains d of the term on every problem outside d).",
    )
    heldout_per_domain: int = Field(
        32, ge=0, description="Held-out problems per domain evaluated after each generation (0: skip)."
    )
    eval_seed: int = Field(1234, description="Seed of the held-out problems (fixed over the run).")
    eval_data: Path | None = Field(
        None, description="A labelled JSONL dataset for held-out evaluation instead of the sandbox."
    )
    executor: str = Field("local", description="Where gradient phases and scoring run: local | ray.")
    ray_address: str | None = Field(None, description="Ray cluster address (default: start a local Ray).")
    ray_workers: int = Field(2, ge=1, description="Workers of a local Ray.")
    ray_max_retries: int = Field(
        3,
        ge=0,
        description="How often a Ray task whose worker or node was lost is sent again (same arguments, same result); "
        "each retry is recorded in the generation's history line (`retried`).",
    )
    ray_cpus_per_task: float = Field(1.0, gt=0, description="CPUs a Ray training or scoring task asks for.")
    ray_gpus_per_task: float = Field(0.0, ge=0, description="GPUs a Ray training or scoring task asks for.")
    on_train_error: Literal["stop", "keep_member"] = Field(
        "stop",
        description="When a member's training task fails for its own reasons (bad data, a NaN loss; never retried): "
        "`stop` ends the run with the error (the last committed generation stays, `--resume` continues), "
        "`keep_member` keeps the member's weights of the generation before and records the failure "
        "(`train_failed` in the history line).",
    )
    threads: int = Field(2, gt=0, description="torch threads per training/scoring task (fixed: results depend on it).")
    tensorboard: Path | None = Field(None, description="Also log scalars to TensorBoard in this folder.")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vLLM memory fraction.")
    max_num_seqs: int = Field(256, ge=1, description="vLLM sequences per engine step.")

    _domains = field_validator("domains")(check_domains)
    _diffs = field_validator("difficulties")(check_difficulties)
    _answer = field_validator("answer")(one_of("answer mode", MODES))

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: str) -> str:
        if v not in ("ground_truth", "hidden"):
            raise ValueError(f"labels must be ground_truth or hidden, got {v!r}")
        return v

    @field_validator("executor")
    @classmethod
    def _executor(cls, v: str) -> str:
        if v not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, got {v!r}")
        return v

    @field_validator("fitness")
    @classmethod
    def _fitness(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(FITNESS_TERMS))
        if unknown:
            raise ValueError(f"unknown fitness term(s) {unknown}; known: {list(FITNESS_TERMS)}")
        bad = sorted(k for k, w in v.items() if not (w >= 0 and w < float("inf")))
        if bad:
            raise ValueError(f"fitness weights must be finite and >= 0; bad: {bad}")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one fitness term needs a weight > 0")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EvolveConfig:
        if self.labels == "hidden" and self.fitness.get("correctness", 0) > 0:
            raise ValueError(
                "labels: hidden never reads answers, so the `correctness` fitness term must have weight 0 "
                "(use `consensus` instead)"
            )
        if self.curriculum.enabled:
            if self.curriculum.proposer == "frontier" and self.data is not None:
                raise ValueError(
                    "the frontier proposer climbs the sandbox's levels; a dataset has none: use "
                    "curriculum.proposer: agreement"
                )
            start = self.curriculum.start_level
            if start is not None and start not in self.difficulties:
                raise ValueError(f"curriculum.start_level {start} is not one of difficulties {list(self.difficulties)}")
        ret = self.retention
        if ret.teachers and self.labels != "hidden":
            raise ValueError("retention.teachers labels with the teachers' chains: it needs labels: hidden")
        if self.label_top_k is not None and self.label_peers != "routed":
            raise ValueError(
                f"label_top_k sizes the routed labellers: it needs label_peers: routed, not {self.label_peers}"
            )
        if ret.teachers and self.label_peers == "routed":
            raise ValueError(
                "retention.teachers and label_peers: routed both choose who labels a problem; use one of them"
            )
        if ret.validates and self.data is not None and ret.data is None:
            raise ValueError(
                "retention.guard and retention.teachers validate on labelled problems: a run on a dataset needs "
                "retention.data (a labelled JSONL file that is not the held-out test set)"
            )
        if self.control is not None and self.heldout_per_domain == 0 and self.eval_data is None:
            raise ValueError("a `control` is there to be compared on the held-out problems: set heldout_per_domain > 0")
        if self.members is not None and self.out is None:
            raise ValueError("`members` selects a subset for a copy: it needs `out`")
        return self
