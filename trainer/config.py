"""Configs of the offline commands: YAML files go straight into frozen pydantic models.

Every field is documented where it is declared; the CLI help is generated from these
descriptions, and CLI flags override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ensemble_serve.shared.cliutil import ConfigError, load_config  # noqa: F401 (re-exported for the trainer)
from trainer.tasks.sandbox import DOMAINS

ALL_DOMAINS = tuple(DOMAINS)


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_domains(v: tuple[str, ...]) -> tuple[str, ...]:
    if not v:
        raise ValueError("at least one domain is needed")
    unknown = [d for d in v if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {sorted(DOMAINS)}")
    return v


def _check_difficulties(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or any(d not in (1, 2, 3, 4) for d in v):
        raise ValueError(f"difficulties must be a non-empty subset of 1..4, got {list(v)}")
    return v


class SubstrateConfig(_Config):
    """`ensemble-train substrate`: a small Llama trained from scratch on the sandbox."""

    out: Path = Field(Path("runs/substrate"), description="Folder to write the Hugging Face model to.")
    seed: int = Field(0, description="Seed for weights, data order and evaluation problems.")
    hidden_size: int = Field(128, gt=0, description="Model width.")
    intermediate_size: int = Field(384, gt=0, description="MLP width.")
    num_layers: int = Field(4, gt=0, description="Transformer blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads (hidden_size must divide by it).")
    max_position_embeddings: int = Field(256, ge=64, description="Context length in tokens (characters).")
    steps: int = Field(
        2400, ge=1, description="Optimizer steps. Training is by steps, not time, so a seed gives one model."
    )
    batch_size: int = Field(64, gt=0, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay to 10%).")
    warmup_steps: int = Field(100, ge=0, description="Warm-up steps.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Sandbox domains to train on.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels (1..4) to train on.")
    eval_per_domain: int = Field(
        64, ge=0, description="Held-out problems per domain for the accuracy report (0: skip)."
    )
    threads: int = Field(2, gt=0, description="CPU threads for torch (fixed, for reproducibility).")

    _domains = field_validator("domains")(_check_domains)
    _diffs = field_validator("difficulties")(_check_difficulties)

    @model_validator(mode="after")
    def _heads_divide(self) -> SubstrateConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 32:
            # vLLM's CPU attention kernels refuse smaller head sizes (e.g. 16) at the first request
            raise ValueError(
                f"head size hidden_size/num_heads = {head_dim} must be a multiple of 32 (vLLM's CPU attention)"
            )
        return self


class InitConfig(_Config):
    """`ensemble-train init`: a diverse starting population of LoRA adapters on the substrate."""

    base: Path = Field(
        Path("runs/substrate"), description="Base model folder (the substrate, or any Llama-like HF model)."
    )
    base_name: str | None = Field(
        None, description="Identifier recorded as the members' base model (default: the folder name)."
    )
    out: Path = Field(Path("runs/population"), description="Population directory to create.")
    members: int = Field(8, ge=1, le=64, description="Population size.")
    seed: int = Field(0, description="Population seed; member i uses seed + i.")
    ranks: tuple[int, ...] = Field((4, 8, 16), description="LoRA ranks, assigned round-robin (diversity).")
    alpha_over_rank: float = Field(2.0, gt=0, description="lora_alpha = alpha_over_rank * rank.")
    dropouts: tuple[float, ...] = Field((0.0, 0.05, 0.1), description="LoRA dropouts, assigned round-robin.")
    lrs: tuple[float, ...] = Field((1e-3, 2e-3, 4e-3), description="Warm-up learning rates, assigned round-robin.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="Linear layers that carry LoRA.",
    )
    warmup_steps: int = Field(120, ge=0, description="Supervised warm-up steps per member (0: untrained adapters).")
    batch_size: int = Field(32, gt=0, description="Warm-up batch size.")
    focus_weight: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Share of a member's warm-up data drawn from its focus domain (member i focuses on domain i mod #domains); "
        "the rest is drawn from all domains.",
    )
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Domains of the warm-up data.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels of the warm-up data.")
    data: Path | None = Field(
        None,
        description="A JSONL dataset (prompt, answer, domain, chain) used instead of the sandbox; rows need a chain.",
    )
    overwrite: bool = Field(False, description="Replace an existing population directory.")
    threads: int = Field(2, gt=0, description="CPU threads for torch.")

    _domains = field_validator("domains")(_check_domains)
    _diffs = field_validator("difficulties")(_check_difficulties)

    @field_validator("ranks", "dropouts", "lrs")
    @classmethod
    def _non_empty(cls, v: tuple) -> tuple:
        if not v:
            raise ValueError("needs at least one value")
        return v

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 or r > 64 for r in v):
            raise ValueError(f"ranks must be in 1..64, got {list(v)}")
        return v


class EvalConfig(_Config):
    """`ensemble-train eval`: per-domain accuracy of each member, generated with vLLM."""

    population: Path = Field(Path("runs/population"), description="Population directory to evaluate.")
    per_domain: int = Field(64, ge=1, description="Held-out problems per domain.")
    seed: int = Field(1234, description="Seed of the held-out problems.")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Domains to evaluate.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Difficulty levels to evaluate.")
    data: Path | None = Field(None, description="A labelled JSONL dataset to evaluate on instead of the sandbox.")
    include_base: bool = Field(True, description="Also evaluate the base model without an adapter.")
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    out: Path | None = Field(
        None,
        description="Write the results as JSON here, and the gate heat map as <name>-specialisation.png beside it.",
    )
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="vLLM memory fraction (on the CPU backend: of NUMA node 0's memory)."
    )

    _domains = field_validator("domains")(_check_domains)
    _diffs = field_validator("difficulties")(_check_difficulties)


FITNESS_TERM_NAMES = (
    "correctness",
    "consensus",
    "cross_eval",
    "diversity_embedding",
    "diversity_hidden",
    "diversity_output",
    "contribution",
)
"""Names of the fitness terms (their code is the registry in trainer/fitness.py)."""


class EvolutionConfig(_Config):
    """The evolutionary step: which operators run, with what settings (names from trainer/operators.py)."""

    enabled: bool = Field(True, description="Run selection/crossover/mutation/replacement (off: gradient phase only).")
    elite: int = Field(2, ge=0, description="Fittest members carried over unchanged by the evolutionary step.")
    offspring: int = Field(
        2, ge=0, description="Children made each generation; they replace members chosen by `replacement`."
    )
    selection: str = Field(
        "tournament", description="Parent selection: truncation | tournament | fitness_proportional."
    )
    selection_options: dict[str, int | float] = Field(
        default_factory=dict, description="Options of the selection operator (truncation: fraction; tournament: size)."
    )
    crossover: str = Field(
        "weighted_average", description="Crossover: weighted_average | svd_interpolate | layer_wise | none."
    )
    rank_policy: str = Field(
        "error",
        description="When parents' ranks differ and the crossover needs equal ranks: error | truncate | pad.",
    )
    child_rank: int | None = Field(
        None, ge=1, le=64, description="Rank of every child (default: the rank of its fitter parent)."
    )
    mutation: str = Field("gaussian", description="Mutation of children: gaussian | dropout | svd | none.")
    mutation_strength: float = Field(
        0.05, ge=0, description="Mutation strength (noise scale, drop rate, or SVD sigma)."
    )
    replacement: str = Field("weakest", description="Who the children replace: weakest | generational.")


class LifecycleConfig(_Config):
    """The adapter lifecycle after the evolutionary step: death, alpha-blend inheritance, SVD mutation, reallocation.

    Off by default, and every part is its own switch: in the decomposition study the lifecycle
    was a net drag, so it exists for the factorial ablation to measure on other data, not as a
    recommended setting. With `enabled` false nothing below is read and a run is unchanged.
    """

    enabled: bool = Field(False, description="Run the lifecycle after the evolutionary step each generation.")
    death_fitness: float | None = Field(
        None, allow_inf_nan=False, description="Members whose fitness is below this die (None: no death by fitness)."
    )
    max_age: int | None = Field(
        None,
        ge=1,
        description="Members older than this many generations (generation - born_generation) die (None: no death by age).",
    )
    max_deaths: int = Field(2, ge=1, description="At most this many deaths per generation, weakest first.")
    inherit_alpha: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Alpha-blend inheritance: a dying member's update is blended into its nearest living neighbour "
        "with this weight (0: off).",
    )
    svd_mutation: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Strength of the SVD mutation applied to every surviving non-elite member each generation (0: off).",
    )
    reallocation: Literal["best", "fresh"] = Field(
        "best",
        description="What re-seeds a dead member's slot: best (a copy of the fittest member, SVD-mutated when "
        "svd_mutation > 0) or fresh (a new adapter of the dead member's rank: A kaiming-uniform, B zero).",
    )


class EvolveConfig(_Config):
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
    temperature: float = Field(0.8, ge=0, description="Sampling temperature of the self-play chains.")
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    answer: str = Field("auto", description="Answer extractor for chains (as the server's `answer` option).")
    fitness: dict[str, float] = Field(
        default_factory=lambda: {
            "correctness": 1.0,
            "consensus": 0.0,
            "cross_eval": 0.1,
            "diversity_embedding": 0.05,
            "diversity_output": 0.05,
            "contribution": 0.2,
        },
        description="Weight of each fitness term (correctness, consensus, cross_eval, diversity_embedding, "
        "diversity_hidden, diversity_output, contribution).",
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
    train_lr: float | None = Field(
        None, gt=0, description="Learning rate of the gradient phase (default: each member's own warm-up lr)."
    )
    share_chains: bool = Field(True, description="Members also learn from other members' verified chains.")
    evolution: EvolutionConfig = Field(default_factory=EvolutionConfig, description="The evolutionary step.")
    lifecycle: LifecycleConfig = Field(
        default_factory=LifecycleConfig,
        description="The adapter lifecycle after the evolutionary step (off by default).",
    )
    fitness_scope: Literal["global", "domain_loo"] = Field(
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
    threads: int = Field(2, gt=0, description="torch threads per training/scoring task (fixed: results depend on it).")
    tensorboard: Path | None = Field(None, description="Also log scalars to TensorBoard in this folder.")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vLLM memory fraction.")
    max_num_seqs: int = Field(256, ge=1, description="vLLM sequences per engine step.")

    _domains = field_validator("domains")(_check_domains)
    _diffs = field_validator("difficulties")(_check_difficulties)

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
        unknown = sorted(set(v) - set(FITNESS_TERM_NAMES))
        if unknown:
            raise ValueError(f"unknown fitness term(s) {unknown}; known: {list(FITNESS_TERM_NAMES)}")
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
        if self.members is not None and self.out is None:
            raise ValueError("`members` selects a subset for a copy: it needs `out`")
        return self


class RouterCommandConfig(_Config):
    """`ensemble-train router`: train a population's mixture router on per-prompt member quality and install it."""

    population: Path = Field(Path("runs/population"), description="Population directory whose router is trained.")
    data: Path | None = Field(
        None,
        description="A labelled JSONL dataset (prompt, answer, optional domain) instead of the sandbox; "
        "heldout_per_domain rows per domain (at most half of each) are held out for evaluation.",
    )
    skip_invalid: bool = Field(
        False, description="Skip malformed dataset lines (reported) instead of refusing the file."
    )
    per_domain: int = Field(48, ge=1, description="Sandbox training problems per domain.")
    heldout_per_domain: int = Field(
        16, ge=0, description="Held-out problems per domain for the accuracy report (0: no evaluation)."
    )
    seed: int = Field(0, description="Seed of the training problems, the router's initial weights and batch order.")
    eval_seed: int = Field(1234, description="Seed of the held-out problems (and of the hold-out split of --data).")
    domains: tuple[str, ...] = Field(ALL_DOMAINS, description="Sandbox domains.")
    difficulties: tuple[int, ...] = Field((1, 2, 3, 4), description="Sandbox difficulty levels.")
    variant: Literal["softmax", "sigmoid_floor"] = Field(
        "sigmoid_floor", description="Router variant: softmax (zero-sum baseline) or sigmoid_floor (floored gates)."
    )
    feature: Literal["embedding_mean", "hidden_mean"] | None = Field(
        None,
        description="Prompt feature: embedding_mean or hidden_mean (default: the variant's own; "
        "softmax: embedding_mean, sigmoid_floor: hidden_mean).",
    )
    hidden_dim: int = Field(0, ge=0, description="Width of one hidden layer of the router; 0 = linear.")
    steps: int = Field(300, ge=1, description="Router optimizer steps (by steps, so a seed gives one router).")
    lr: float = Field(1e-2, gt=0, description="Router AdamW learning rate.")
    floor_max: float = Field(0.1, ge=0, lt=1, description="sigmoid_floor: upper bound of the learnable gate floors.")
    t_start: float = Field(2.0, gt=0, description="sigmoid_floor: gate temperature at the first step.")
    t_end: float = Field(0.5, gt=0, description="sigmoid_floor: temperature at the last step and at inference.")
    anneal: Literal["linear", "cosine"] = Field("cosine", description="Temperature schedule: linear or cosine.")
    top_k: int = Field(
        3, ge=1, description="Members a routed request fans out to (recorded in the manifest; <= member count)."
    )
    max_tokens: int = Field(128, gt=0, description="Generation limit per chain.")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vLLM memory fraction.")
    out: Path | None = Field(None, description="Write the results as JSON here.")

    _domains = field_validator("domains")(_check_domains)
    _diffs = field_validator("difficulties")(_check_difficulties)

    @model_validator(mode="after")
    def _bounded_anneal(self) -> RouterCommandConfig:
        # the router itself refuses this too, but only after the expensive generation phase
        if self.t_end > self.t_start:
            raise ValueError(f"t_end ({self.t_end}) must be <= t_start ({self.t_start}): the anneal only cools")
        return self


ABLATION_FACTORS: dict[str, tuple[str, str]] = {
    "router": ("softmax", "sigmoid_floor"),
    "scope": ("global", "domain_loo"),
    "lifecycle": ("off", "on"),
    "evolution": ("off", "on"),
    "init": ("random", "pre_aligned"),
}
"""The switches the ablation can vary, each with its (reference, test) levels: an effect is ref - test."""

HARNESS_EVOLVE_KEYS = ("population", "out", "members", "generations", "seed", "fitness_scope", "heldout_per_domain")
"""EvolveConfig fields the ablation sets per cell itself (so they cannot be in its `evolve` section)."""


class AblateConfig(_Config):
    """`ensemble-train ablate`: a two-level factorial over the switches, n seeds per cell, a fixed budget per cell."""

    out: Path = Field(Path("runs/ablate"), description="Folder of the ablation: cells, evolved populations, report.")
    population: Path | None = Field(
        None, description="The pre-aligned starting population (default: the embedded sandbox population)."
    )
    factors: tuple[str, ...] = Field(
        ("router", "scope", "lifecycle"),
        description="Switches to vary: router, scope, lifecycle, evolution, init.",
    )
    design: Literal["full", "half"] = Field(
        "full",
        description="full: all 2^k cells; half: the 2^(k-1) cells of the defining relation I = product of all factors.",
    )
    fixed: dict[str, str] = Field(
        default_factory=dict,
        description="Levels of the switches that are not varied (defaults: router sigmoid_floor, scope global, "
        "lifecycle off, evolution on, init pre_aligned).",
    )
    seeds: tuple[int, ...] = Field((0, 1, 2), description="Seeds; every cell runs once per seed (paired by seed).")
    generations: int = Field(
        2, ge=1, description="Evolve generations per cell: the fixed step budget with evolve.train_steps."
    )
    evolve: dict[str, Any] = Field(
        default_factory=lambda: {
            "lifecycle": {"death_fitness": 0.42, "max_deaths": 1, "inherit_alpha": 0.5, "svd_mutation": 0.02}
        },
        description="EvolveConfig settings shared by every cell (not population/out/generations/seed/fitness_scope).",
    )
    router: dict[str, Any] = Field(
        default_factory=dict, description="RouterTrainConfig settings shared by every cell (not variant/seed)."
    )
    router_objective: Literal["quality", "mixture"] = Field(
        "quality",
        description="quality: fit gates to each member's per-prompt quality (softmax over members of their reference-"
        "chain log-likelihoods); mixture: train end to end through the mixture on the chains' NLL.",
    )
    quality_tau: float = Field(
        0.1, gt=0, description="Temperature of the quality softmax over members' mean token log-likelihoods."
    )
    router_per_domain: int = Field(32, ge=1, description="Sandbox training prompts per domain for the router.")
    heldout_per_domain: int = Field(
        16, ge=1, description="Held-out prompts per domain whose reference chains are scored."
    )
    eval_seed: int = Field(1234, description="Seed of the held-out problems (the same for every cell and seed).")
    top_k: int | None = Field(
        None, ge=1, description="Members kept in each prompt's mixture (None: all, weighted by the normalised gates)."
    )
    interactions: tuple[tuple[str, str], ...] = Field(
        (), description="Pairs (A, B): report A's effect at each level of B and their difference."
    )
    threads: int = Field(2, gt=0, description="torch threads of the router training and scoring.")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vLLM memory fraction.")

    @field_validator("factors")
    @classmethod
    def _known_factors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in v if f not in ABLATION_FACTORS]
        if unknown:
            raise ValueError(f"unknown factor(s) {unknown}; known: {list(ABLATION_FACTORS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a factor is listed twice: {list(v)}")
        if not v:
            raise ValueError("an ablation needs at least one factor")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {list(v)}")
        if len(v) < 2:
            raise ValueError(f"a paired t-test across seeds needs at least 2 seeds, got {list(v)}")
        return v

    @field_validator("fixed", mode="before")
    @classmethod
    def _yaml_switches(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean; accept it for the switches whose levels are off/on
        if isinstance(v, dict):
            return {
                k: ("on" if x else "off") if isinstance(x, bool) and ABLATION_FACTORS.get(k) == ("off", "on") else x
                for k, x in v.items()
            }
        return v

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, v: dict[str, str]) -> dict[str, str]:
        for name, level in v.items():
            if name not in ABLATION_FACTORS:
                raise ValueError(f"fixed: unknown factor {name!r}; known: {list(ABLATION_FACTORS)}")
            if level not in ABLATION_FACTORS[name]:
                raise ValueError(f"fixed: {name} has levels {list(ABLATION_FACTORS[name])}, got {level!r}")
        return v

    @field_validator("evolve")
    @classmethod
    def _evolve(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(v) & set(HARNESS_EVOLVE_KEYS))
        if taken:
            raise ValueError(f"evolve: {taken} are set by the harness for each cell; remove them")
        EvolveConfig(**v)  # unknown or bad settings are refused before any cell runs
        return v

    @field_validator("router")
    @classmethod
    def _router(cls, v: dict[str, Any]) -> dict[str, Any]:
        from trainer.router.train import RouterTrainConfig

        taken = sorted(set(v) & {"variant", "seed"})
        if taken:
            raise ValueError(f"router: {taken} are set by the harness (the router factor and the cell's seed)")
        RouterTrainConfig(**v)
        return v

    @model_validator(mode="after")
    def _design(self) -> AblateConfig:
        both = sorted(set(self.factors) & set(self.fixed))
        if both:
            raise ValueError(f"{both} cannot be both varied (factors) and fixed")
        k = len(self.factors)
        if self.design == "half" and k < 3:
            raise ValueError(
                f"a half fraction of {k} factor(s) is impossible to read: with I = {'*'.join(self.factors)} "
                "a main effect is aliased with another main effect (or the mean); use design: full, or vary >= 3 factors"
            )
        lifecycle_on = "lifecycle" in self.factors or self.fixed.get("lifecycle") == "on"
        if lifecycle_on:
            life = LifecycleConfig(**{**self.evolve.get("lifecycle", {}), "enabled": True})
            if life.death_fitness is None and life.max_age is None and not life.inherit_alpha and not life.svd_mutation:
                raise ValueError(
                    "lifecycle 'on' would do nothing: set evolve.lifecycle.death_fitness or max_age, inherit_alpha "
                    "or svd_mutation"
                )
        for pair in self.interactions:
            if len(pair) != 2 or pair[0] == pair[1] or any(f not in self.factors for f in pair):
                raise ValueError(
                    f"interactions: {list(pair)} must name two different varied factors {list(self.factors)}"
                )
            if self.design == "half" and k == 3:
                raise ValueError(
                    f"interactions: in a half fraction of 3 factors {list(pair)} is aliased with the third factor's "
                    "main effect; use design: full"
                )
        return self
