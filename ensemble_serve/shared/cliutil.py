"""Click options generated from a frozen pydantic config model: one flag per field, its help the field's description."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import BaseModel, ValidationError


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
    if typing.get_origin(ann) is tuple and (field.json_schema_extra or {}).get("nargs"):
        # vLLM's form: the flag takes one or more values (`--lora-modules a=P b=P`, see NargsCommand)
        return click.option(
            flag,
            name,
            multiple=True,
            default=None,
            metavar="VALUE ...",
            help=field.description,
            callback=lambda _c, _p, v: tuple(v) or None,
        )
    if typing.get_origin(ann) is tuple:
        # comma-separated, and the flag may repeat (`--remote A --remote B` is `--remote A,B`, not B alone)
        inner = args[0]
        return click.option(
            flag,
            name,
            multiple=True,
            default=None,
            metavar="A,B,...",
            help=help_text + " Comma-separated; the flag may repeat.",
            callback=lambda _c, _p, v: (
                None if not v else tuple(inner(x.strip()) for part in v for x in part.split(",") if x.strip())
            ),
        )
    click_type = {int: int, float: float, str: str, Path: click.Path(path_type=Path)}.get(ann, str)
    return click.option(flag, name, type=click_type, default=None, help=help_text)


class NargsCommand(click.Command):
    """A command whose `nargs` fields take several values after one flag, as argparse's `nargs="+"` does
    (`--lora-modules a=P b=P` means `--lora-modules a=P --lora-modules b=P`); the repeated form works too."""

    def __init__(self, *args: Any, nargs_flags: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nargs_flags = nargs_flags

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_nargs(args, self.nargs_flags))


def expand_nargs(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """Repeat a flag before each of the values that follow it, up to the next option."""
    out: list[str] = []
    current: str | None = None
    for arg in args:
        if arg == "--":
            current = None
            out.append(arg)
        elif arg.startswith("-") and len(arg) > 1:
            name, eq, _ = arg.partition("=")
            current = name if name in flags and not eq else None
            out.append(arg)
        elif current is not None and out and out[-1] != current:
            out.extend([current, arg])
        else:
            out.append(arg)
    return out


def nargs_flags(model: type[BaseModel]) -> tuple[str, ...]:
    """The flags of `model`'s fields marked ``json_schema_extra={"nargs": True}``."""
    return tuple(
        "--" + n.replace("_", "-") for n, f in model.model_fields.items() if (f.json_schema_extra or {}).get("nargs")
    )


def _file_only(ann: Any) -> bool:
    if typing.get_origin(ann) is dict:
        return True
    if typing.get_origin(ann) is tuple and any(typing.get_origin(a) is tuple for a in typing.get_args(ann)):
        return True  # a tuple of tuples has no comma-separated form
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def config_options(model: type[BaseModel]) -> Callable:
    """Add `--config FILE` plus one option per field of `model`."""

    def wrap(fn: Callable) -> Callable:
        for name, field in reversed(list(model.model_fields.items())):
            if _file_only(field.annotation):
                continue  # mappings and nested sections are set in the config file
            fn = _option_for(name, field)(fn)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="YAML file with these options (flags given here override it).",
        )(fn)

    return wrap


C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the file."""


def load_config(cls: type[C], path: Path | None, overrides: dict[str, Any]) -> C:
    """Read YAML `path` (optional) into `cls`, with non-None `overrides` on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of option: value")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        where = f"config file {path}" if path else "options"
        raise ConfigError(f"invalid {where}:\n{e}") from None
