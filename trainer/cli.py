"""`ensemble-train`: the offline commands. Thin: options come from the config models' fields."""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel

from trainer.config import ConfigError, EvalConfig, InitConfig, SubstrateConfig, load_config


def _option_for(name: str, field: Any) -> Callable:
    """A click option for one config field; its default is None so the file's value stands."""
    flag = "--" + name.replace("_", "-")
    ann = field.annotation
    args = typing.get_args(ann)
    if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union:
        ann = next(a for a in args if a is not type(None))
        args = typing.get_args(ann)
    default = field.default
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = f"{field.description} [default: {shown}]"
    if ann is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if typing.get_origin(ann) is tuple:
        inner = args[0]
        return click.option(
            flag, name, default=None, metavar="A,B,...", help=help_text,
            callback=lambda _c, _p, v: None if v is None else tuple(inner(x.strip()) for x in v.split(",") if x.strip()),
        )
    click_type = {int: int, float: float, str: str, Path: click.Path(path_type=Path)}.get(ann, str)
    return click.option(flag, name, type=click_type, default=None, help=help_text)


def config_options(model: type[BaseModel]) -> Callable:
    """Add `--config FILE` plus one option per field of `model`."""

    def wrap(fn: Callable) -> Callable:
        for name, field in reversed(list(model.model_fields.items())):
            fn = _option_for(name, field)(fn)
        return click.option(
            "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
            help="YAML file with these options (flags given here override it).",
        )(fn)

    return wrap


def _load(model: type[BaseModel], config_file: Path | None, overrides: dict[str, Any]) -> Any:
    try:
        return load_config(model, config_file, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Offline half of ensemble-serve: the sandbox substrate, the starting population, evaluation."""


@main.command()
@config_options(SubstrateConfig)
def substrate(config_file: Path | None, **overrides: Any) -> None:
    """Train the sandbox substrate: a small Llama-architecture LM from scratch on the sandbox tasks.

    Writes a standard Hugging Face model folder (safetensors, tokenizer with chat
    template) that transformers, PEFT and vLLM load unchanged, and prints its
    held-out accuracy per domain.
    """
    from trainer.substrate import train_substrate

    cfg = _load(SubstrateConfig, config_file, overrides)
    report = train_substrate(cfg)
    click.echo(
        f"substrate: {report['parameters']:,} parameters, {report['steps']} steps in {report['train_seconds']:.0f}s, "
        f"final loss {report['final_loss']}"
    )
    for domain, acc in report["heldout_accuracy"].items():
        click.echo(f"  held-out accuracy {domain:<7} {acc:.3f}")
    click.echo(f"saved to {cfg.out}")


@main.command()
@config_options(InitConfig)
def init(config_file: Path | None, **overrides: Any) -> None:
    """Create a diverse starting population of PEFT LoRA adapters on a base model.

    Members differ in seed, rank, dropout, learning rate and warm-up data (each one
    focuses on one domain). Writes the population directory atomically.
    """
    from trainer.init_population import init_population

    cfg = _load(InitConfig, config_file, overrides)
    try:
        population = init_population(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for m in population.manifest.members:
        click.echo(f"  {m.name}: rank {m.rank}, alpha {m.alpha:g}, dropout {m.info['dropout']}, lr {m.info['lr']}, focus {m.info['focus_domain']}")


@main.command(name="eval")
@config_options(EvalConfig)
@click.option("--update-manifest", is_flag=True, help="Record each member's per-domain accuracy and fitness in population.json.")
def eval_(config_file: Path | None, update_manifest: bool, **overrides: Any) -> None:
    """Measure each member's per-domain accuracy on held-out problems with vLLM.

    All members (and the bare base model) are batched in one multi-LoRA engine.
    """
    from trainer.evaluate import format_table, run_eval

    cfg = _load(EvalConfig, config_file, overrides)
    try:
        result = run_eval(cfg, update_manifest=update_manifest)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{result['problems']} problems, engine load {result['engine_load_seconds']}s, "
        f"generation {result['generate_seconds']}s"
    )
    click.echo(format_table(result["accuracy"]))
    if cfg.out:
        click.echo(f"results written to {cfg.out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
