"""`ensemble-serve`: the online commands. Options come from `ServeConfig`'s fields."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import uvicorn

from ensemble_serve.config import ServeConfig
from ensemble_serve.http.app import build_app
from ensemble_serve.http.shutdown import Drain, GracefulServer
from ensemble_serve.protocol import EnsembleOptions
from ensemble_serve.shared.bring_your_own import import_adapters
from ensemble_serve.shared.cliutil import ConfigError, NargsCommand, config_options, load_config, nargs_flags
from ensemble_serve.shared.embedded import EMBEDDED_REAL_POPULATION, embedded_real_gguf
from ensemble_serve.shared.engine_config import ContextSizeError, on_cpu, size_context
from ensemble_serve.shared.gguf import GGUFError, cached_conversion
from ensemble_serve.shared.population import PopulationError, copy_with_base_path, load_population, write_manifest


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Serve a population of LoRA adapters as one model behind an OpenAI-compatible API."""


@main.command(cls=NargsCommand, nargs_flags=nargs_flags(ServeConfig))
@config_options(ServeConfig)
def up(config_file: Path | None, **overrides: Any) -> None:
    """Start the server: vLLM in-process with every member registered as a LoRA adapter.

    With no options it serves the embedded ensemble (specialists of SmolLM2-135M-Instruct, whose
    base is converted from the packaged GGUF into the user cache on the first start) on
    127.0.0.1:8000; `--embedded sandbox` serves the project's toy ensemble instead. The
    ensemble, each member and the base model are models of the OpenAI API
    (`GET /v1/models`); `POST /v1/chat/completions` and `/v1/completions` with the
    ensemble's name fan out, vote and return the consensus.

    Bring your own: `--model BASE --lora-modules a=PATH b=PATH` serves PEFT adapters
    trained elsewhere as the ensemble `ensemble` (checked against the base first).
    """
    try:
        cfg = load_config(ServeConfig, config_file, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="ensemble-serve-") as scratch:
        if cfg.model is not None:
            cfg = _import_for_serving(cfg, Path(scratch) / "population")
        elif cfg.population is None and cfg.embedded == "real":
            cfg = _embedded_real_for_serving(cfg, Path(scratch) / "population")
        try:
            population = load_population(cfg.population_dir)  # fail fast, before the engine starts
            base = population.manifest.base_model
            if not cfg.remote and population.base_model_path is None and base.hub_id is None:
                raise PopulationError(
                    f"{population.root}: the manifest names its base model {base.name!r} by fingerprint only "
                    f"(sha256 {str(base.sha256)[:16]}...); set base_model.path in population.json to your copy of it"
                )
            if not cfg.remote and on_cpu():
                size_context(
                    population.base_model_path, cfg.engine_config()
                )  # a context that cannot fit: one line, no trace
            if not cfg.remote and population.base_model_path is not None:
                _check_tokenizer(population.base_model_path)
        except (PopulationError, ContextSizeError) as e:
            raise click.ClickException(str(e)) from None
        _serve(cfg)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_tokenizer(base: Path) -> None:
    """vLLM needs the base's tokenizer: a folder of weights alone is refused here in one line, not by a trace later."""
    if not any((base / name).is_file() for name in TOKENIZER_FILES) and not any(base.glob("*.tiktoken")):
        raise PopulationError(
            f"{base}: the base model has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files of the model its weights came from into it (`ensemble-train base --from-gguf` writes them)"
        )


def _import_for_serving(cfg: ServeConfig, dest: Path) -> ServeConfig:
    """`--model` with `--lora-modules`: check the adapters and serve a population made of copies of them."""
    try:
        import_adapters(
            cfg.model,
            cfg.adapter_specs(),
            dest,
            ignore_base_name=cfg.ignore_base_name,
            max_lora_rank=cfg.max_lora_rank,
        )
    except PopulationError as e:
        raise click.ClickException(str(e)) from None
    return cfg.model_copy(
        update={
            "population": dest,
            "served_model_name": cfg.ensemble_name,
            "watch": False,
            "model": None,
            "lora_modules": (),
        }
    )


def _embedded_real_for_serving(cfg: ServeConfig, dest: Path) -> ServeConfig:
    """The embedded real population, copied to `dest` with its base model: the cached conversion of the packaged GGUF.

    The first start converts the GGUF (once, under a lock; later starts reuse the cache). The copy's
    manifest points at the cache, and its fingerprint check still applies: a cache holding other
    weights is refused.
    """
    try:
        base = cached_conversion(embedded_real_gguf())
    except (GGUFError, FileNotFoundError) as e:
        raise click.ClickException(
            f"{e}\n(or serve the toy ensemble, which needs no download: ensemble-serve up --embedded sandbox)"
        ) from None
    try:
        copy_with_base_path(EMBEDDED_REAL_POPULATION, dest, str(base))
    except PopulationError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"embedded ensemble {cfg.ensemble_name}: base {base.name} from {base}", err=True)
    return cfg.model_copy(update={"population": dest, "served_model_name": cfg.ensemble_name, "watch": False})


def _serve(cfg: ServeConfig) -> None:
    drain = Drain(cfg.shutdown_grace)
    app = build_app(cfg, drain=drain)
    # uvicorn's own bound is a backstop: the drain ends every request at the grace (see shutdown.py)
    server_config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.shutdown_grace + 5
    )
    GracefulServer(server_config, drain).run()


@main.command()
@click.argument("population", type=click.Path(path_type=Path, file_okay=False))
@click.option("--set", "options", metavar="JSON", help='The `ensemble` options, e.g. \'{"vote": "calibrated"}\'.')
@click.option("--clear", is_flag=True, help="Remove the population's defaults (requests get the built-in ones).")
def defaults(population: Path, options: str | None, clear: bool) -> None:
    """Show or set the `ensemble` options a request gets for what it leaves unset.

    They live in the manifest (`ensemble_defaults`); a running server watching the
    directory picks them up. The options are checked as a request's `ensemble`
    object is, and the manifest is replaced atomically.
    """
    if options is not None and clear:
        raise click.UsageError("give --set or --clear, not both")
    try:
        pop = load_population(population)
    except PopulationError as e:
        raise click.ClickException(str(e)) from None
    if options is None and not clear:
        click.echo(json.dumps(pop.manifest.ensemble_defaults or {}, indent=2))
        return
    value = None
    if options is not None:
        try:
            raw = json.loads(options)
        except json.JSONDecodeError as e:
            raise click.UsageError(f"--set is not JSON: {e}") from None
        if not isinstance(raw, dict) or not raw:
            raise click.UsageError("--set takes a non-empty JSON object of `ensemble` options")
        try:
            EnsembleOptions.model_validate(raw)
        except (ValueError, TypeError) as e:
            raise click.UsageError(f"not usable as `ensemble` options: {e}") from None
        value = raw
    try:
        write_manifest(pop.root, pop.manifest.model_copy(update={"ensemble_defaults": value}))
    except PopulationError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{pop.root}: ensemble defaults {'cleared' if value is None else json.dumps(value)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
