"""A caller's vLLM engine, shared by the offline commands: the checks before a command uses it.

`eval`, `router`, `calibrate` and `evolve` each start an :class:`OfflineEngine` on their
population, unless the caller passes one (``engine=``): a process that runs several commands (a
test fixture, the ablation, a notebook) then pays vLLM's start-up once. A caller's engine must
run the population's base model and take its adapters' rank; :func:`attach` checks both, then
registers the population's members with it (``registry.sync``: the members are served from this
population's folders, and names it does not hold are forgotten), and the command leaves it
running: it never deletes or shuts down an engine it did not start.
"""

from __future__ import annotations

from pathlib import Path

from ensemble_serve.shared.engine_config import smallest_vllm_rank
from ensemble_serve.shared.offline_engine import OfflineEngine
from ensemble_serve.shared.offline_remote import RemoteOfflineEngine
from ensemble_serve.shared.population import Population
from trainer.settings import RemoteSettings


class EngineMismatch(ValueError):
    """A caller's engine cannot serve this population; the message says why."""


def vllm_lora_rank(biggest: int, child_rank: int | None = None) -> int:
    """The smallest rank vLLM accepts that fits the largest member and the children's rank."""
    try:
        return smallest_vllm_rank(max(biggest, child_rank or 0))
    except ValueError as e:
        raise EngineMismatch(str(e)) from None


def population_lora_rank(population: Population, child_rank: int | None = None) -> int:
    """The max_lora_rank an engine needs for `population` (and children of `child_rank`)."""
    return vllm_lora_rank(max(m.rank for m in population.manifest.members), child_rank)


def engine_lora_rank(engine: OfflineEngine) -> int:
    """The max_lora_rank `engine` was started with (its config's, else the default for its first population)."""
    return engine.cfg.max_lora_rank or population_lora_rank(engine.population)


def base_model_location(population: Population) -> str:
    """Where a population's base model is: its resolved folder, else its hub id."""
    if population.base_model_path is not None:
        return str(Path(population.base_model_path).resolve())
    return str(population.manifest.base_model.hub_id)


def same_base_model(a: Population, b: Population) -> bool:
    """Whether two populations run on the same base model: the same weights' fingerprint when both
    manifests record one, else the same folder (or, with neither folder, the same hub id)."""
    fa, fb = a.manifest.base_model.sha256, b.manifest.base_model.sha256
    if fa and fb:
        return fa == fb
    if (a.base_model_path is None) != (b.base_model_path is None):
        return False
    return base_model_location(a) == base_model_location(b)


def check_engine(engine: OfflineEngine, population: Population, rank: int | None = None) -> None:
    """Refuse a caller's engine that runs another base model or whose max_lora_rank is below `rank`.

    `rank` defaults to what the population's members need; `evolve` asks for its children's too.
    """
    if not same_base_model(engine.population, population):
        raise EngineMismatch(
            f"the shared engine runs the base model {engine.population.manifest.base_model.name!r} "
            f"({base_model_location(engine.population)}), but {population.root} is on "
            f"{population.manifest.base_model.name!r} ({base_model_location(population)}); "
            "pass an engine started on that base model, or none"
        )
    need = rank or population_lora_rank(population)
    have = engine_lora_rank(engine)
    if have < need:
        raise EngineMismatch(
            f"the shared engine's max_lora_rank {have} is below {need}, the rank {population.root}'s members need"
        )


def attach(engine: OfflineEngine, population: Population, rank: int | None = None) -> OfflineEngine:
    """`engine`, checked (:func:`check_engine`) and serving exactly `population`'s members."""
    check_engine(engine, population, rank)
    engine.sync(population)
    return engine


def remote_engine(population: Population, settings: RemoteSettings) -> RemoteOfflineEngine:
    """An engine on `settings.remote`'s vLLM servers, serving `population` (they are checked first)."""
    return RemoteOfflineEngine(
        population,
        settings.remote,
        api_key=settings.remote_api_key,
        adapter_dir=settings.remote_adapter_dir,
        adapter_dir_on_servers=settings.remote_adapter_dir_on_servers,
        concurrency=settings.remote_concurrency,
    )
