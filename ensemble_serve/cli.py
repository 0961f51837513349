"""`ensemble-serve`: the online commands. Options come from `ServeConfig`'s fields."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
import uvicorn

from ensemble_serve.config import ServeConfig
from ensemble_serve.http.app import build_app
from ensemble_serve.http.shutdown import Drain, GracefulServer
from ensemble_serve.shared.cliutil import ConfigError, config_options, load_config
from ensemble_serve.shared.population import PopulationError, load_population


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Serve a population of LoRA adapters as one model behind an OpenAI-compatible API."""


@main.command()
@config_options(ServeConfig)
def up(config_file: Path | None, **overrides: Any) -> None:
    """Start the server: vLLM in-process with every member registered as a LoRA adapter.

    With no options it serves the embedded sandbox ensemble on 127.0.0.1:8000. The
    ensemble, each member and the base model are models of the OpenAI API
    (`GET /v1/models`); `POST /v1/chat/completions` and `/v1/completions` with the
    ensemble's name fan out, vote and return the consensus.
    """
    try:
        cfg = load_config(ServeConfig, config_file, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        load_population(cfg.population_dir)  # fail fast, before the engine starts
    except PopulationError as e:
        raise click.ClickException(str(e)) from None
    drain = Drain(cfg.shutdown_grace)
    app = build_app(cfg, drain=drain)
    # uvicorn's own bound is a backstop: the drain ends every request at the grace (see shutdown.py)
    server_config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.shutdown_grace + 5
    )
    GracefulServer(server_config, drain).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
