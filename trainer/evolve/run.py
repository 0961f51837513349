"""The state of an evolve run: its errors, its run file, how it starts or resumes, how it stops.

A run lives in its population directory: ``evolve-run.json`` (:data:`RUN_FILE`) records the run
id, the full config, the hash of the settings that decide the result (:func:`config_hash`), and
the start and target generations. Invariants:

* a resume must bring the same result-deciding settings (or only ``--population``/``--out``);
  where it runs (executor, Ray, TensorBoard) and how many generations may change;
* a directory that holds an unfinished run is never silently restarted: ``--resume`` finishes
  it, or removing the run file starts over from its last committed generation;
* Ctrl-C and SIGTERM stop a run between whole generations (:func:`stop_signals`), raising
  :class:`Interrupted`; the last committed generation is complete on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ensemble_serve.shared.fsutil import atomic_write_text, copy_file_durable, remove_tree, tmp_dir_beside
from ensemble_serve.shared.lora import LoraError, LoraWeights, align_modules, check_compatible, load_lora
from ensemble_serve.shared.population import Population, create_population, load_population, read_manifest
from trainer.evolve.config import EvolveConfig
from trainer.evolve.lifecycle import LifecycleConfig
from trainer.settings import RemoteSettings

RUN_FILE = "evolve-run.json"


class EvolveError(ValueError):
    """The population, dataset or run state cannot be evolved as asked; the message says why."""


class Interrupted(KeyboardInterrupt):
    """Raised by Ctrl-C or SIGTERM; the last complete generation is on disk."""


# where a run's work runs, and how much of it: a resume may change them, and they are not in the config hash
PLACEMENT = ("executor", "ray_address", "ray_workers", "tensorboard", *RemoteSettings.model_fields)


def config_hash(cfg: EvolveConfig) -> str:
    """Hash of everything that decides the result (not where it runs or how many generations)."""
    data = cfg.model_dump(mode="json", exclude={"generations", *PLACEMENT})
    data.pop("population", None)
    data.pop("out", None)
    # switches added after runs existed: at their defaults they change nothing, so they leave the hash as it was
    if data.get("lifecycle") == LifecycleConfig().model_dump(mode="json"):
        data.pop("lifecycle")
    if data.get("fitness_scope") == "global":
        data.pop("fitness_scope")
    if data.get("label_top_k") is None:
        data.pop("label_top_k", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _read_run(root: Path) -> dict[str, Any] | None:
    path = root / RUN_FILE
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text())
        EvolveConfig.model_validate(run["config"])
        return run
    except (ValueError, KeyError, TypeError) as e:
        raise EvolveError(f"{path}: not a valid run file ({e}); remove it to start a new run") from e


def prepare_run(cfg: EvolveConfig, resume: bool) -> tuple[EvolveConfig, Path, dict[str, Any]]:
    """Resolve the population directory and the run state (create, or reload for --resume)."""
    root = Path(cfg.out or cfg.population)
    if resume:
        return _resume_run(cfg, root)
    if cfg.out is not None:
        _copy_population(cfg)
    if not (root / "population.json").exists():
        raise EvolveError(f"{root}: no population.json (create one with `ensemble-train init`)")
    old = _read_run(root)
    current = read_manifest(root).generation
    if old is not None and old.get("target_generation", 0) > current:
        raise EvolveError(
            f"{root}: holds an interrupted run (generation {current} of {old['target_generation']}); "
            f"pass --resume to finish it, or remove {RUN_FILE} to start over from generation {current}"
        )
    run = {
        "run_id": uuid.uuid4().hex[:12],
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "start_generation": current,
        "target_generation": current + cfg.generations,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(root / RUN_FILE, json.dumps(run, indent=2) + "\n")
    return cfg, root, run


def _resume_run(cfg: EvolveConfig, root: Path) -> tuple[EvolveConfig, Path, dict[str, Any]]:
    """The stored run of `root`, refused when `cfg` changes a setting that decides the result."""
    if not (root / "population.json").exists():
        raise EvolveError(f"{root}: no population to resume")
    run = _read_run(root)
    if run is None:
        raise EvolveError(f"{root}: no run to resume ({RUN_FILE} is missing); start one without --resume")
    stored = EvolveConfig.model_validate(run["config"])
    bare = EvolveConfig(population=cfg.population, out=cfg.out)
    if config_hash(stored) != config_hash(cfg) and cfg.model_dump(exclude=set(PLACEMENT)) != bare.model_dump(
        exclude=set(PLACEMENT)
    ):
        raise EvolveError(
            f"{root}: the run was started with other settings (config {run['config_hash']}, "
            f"given {config_hash(cfg)}); resume with the same config, or with only --population/--out"
        )
    # executor/tensorboard may change on resume; they do not change the result. The remote servers are
    # the stored ones unless this call names others.
    placement = {k: getattr(cfg, k) for k in ("executor", "ray_address", "ray_workers", "tensorboard")}
    if cfg.remote:
        placement |= {k: getattr(cfg, k) for k in RemoteSettings.model_fields}
    stored = stored.model_copy(update=placement)
    return stored, root, run


def _copy_population(cfg: EvolveConfig) -> None:
    """Copy the source population (or a subset of its members) to `cfg.out` as a new population."""
    out = Path(cfg.out)
    if out.exists():
        raise EvolveError(f"{out} already exists; choose a new --out, or pass --resume to continue the run there")
    source = load_population(cfg.population)
    members = list(source.manifest.members)
    if cfg.members is not None:
        unknown = [n for n in cfg.members if n not in source.names]
        if unknown:
            raise EvolveError(f"--members: {unknown} not in {cfg.population} (members: {source.names})")
        members = [m for m in members if m.name in cfg.members]
    base = source.manifest.base_model
    if base.path is not None and source.base_model_path is not None:
        base = base.model_copy(update={"path": os.path.relpath(source.base_model_path.resolve(), out.absolute())})
    update: dict[str, Any] = {
        "members": [m.model_copy(update={"path": f"members/{m.name}"}) for m in members],
        "base_model": base,
    }
    whole = [m.name for m in members] == source.names
    if not whole:  # the router's gates and the table's rows are for every member: a subset keeps neither
        update.update(router=None, reliability=None)
    create_population(
        out, source.manifest.model_copy(update=update), {m.name: source.member_dir(m.name) for m in members}
    )
    if whole:  # the router and the reliability table come along, as `ensemble-serve up` would find them
        for entry, default in ((source.manifest.router, "router"), (source.manifest.reliability, "reliability.json")):
            if entry:
                _copy_into(source.root / str(entry.get("path", default)), out / str(entry.get("path", default)))


def _copy_into(src: Path, dest: Path) -> None:
    """Copy a file or folder of the source population into the new one (a missing source is left missing)."""
    if src.is_dir():
        tmp = tmp_dir_beside(dest)  # the population's own pattern: build beside, then rename into place
        try:
            shutil.copytree(src, tmp / dest.name)
            os.rename(tmp / dest.name, dest)
        finally:
            remove_tree(tmp)
    elif src.is_file():
        copy_file_durable(src, dest)


def load_members(population: Population) -> dict[str, LoraWeights]:
    """Every member's adapter over one set of modules, refused unless all of them can evolve together.

    Members with different target modules (adapters brought from elsewhere) are aligned: a module
    a member does not target is a zero update of its rank (`align_modules`), so crossover and
    mixing see one set of modules. Another base or other module shapes are refused.
    """
    weights = {}
    for name in population.names:
        try:
            weights[name] = load_lora(population.member_dir(name))
        except LoraError as e:
            raise EvolveError(f"member {name}: {e}") from None
    try:
        aligned = align_modules([weights[n] for n in population.names], population.names)
        check_compatible(aligned, population.names)
    except LoraError as e:
        raise EvolveError(f"{population.root}: members cannot evolve together: {e}") from None
    return dict(zip(population.names, aligned))


@contextmanager
def stop_signals(state: dict[str, bool]) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM stop the run after the last complete generation.

    A terminal's Ctrl-C reaches the whole process group, so vLLM's engine processes may die of
    it at the same moment; whatever error that causes here, `state["stop"]` records that a stop
    was asked for, so the run still ends as an interruption, not a crash.
    """

    def handler(signum, frame):  # noqa: ARG001
        state["stop"] = True
        raise Interrupted()

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
