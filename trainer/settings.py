"""What every offline command's settings share: the frozen base model and the checks of names.

Each command's settings live next to its code: `models/config.py` (substrate, init), `evaluate.py`
(eval), `evolve/config.py` (evolve, its evolution and lifecycle sections), `router/config.py`
(router), `study/ablate/config.py` (ablate).

Invariants: a config is frozen and refuses unknown keys (`extra="forbid"`); a name that picks
code (an operator, a fitness term, a variant) is checked against the registry that holds that
code, and the refusal lists the names the registry knows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ensemble_serve.shared.vllm_api import check_server_urls
from trainer.tasks.sandbox import DOMAINS, LEVELS

ALL_DOMAINS = tuple(DOMAINS)


class FrozenConfig(BaseModel):
    """Base of the command configs: immutable, and a misspelt key is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RemoteSettings(BaseModel):
    """Where a command's chains are sampled: remote vLLM servers (`--remote`), else an engine in this process.

    Shared by `evolve`, `eval`, `router` and `calibrate` (ensemble_serve/shared/offline_remote.py says
    what a server must run and how members reach it).
    """

    remote: tuple[str, ...] = Field(
        (),
        description="Base URLs of vLLM OpenAI servers on the population's base model, started with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora, that sample the chains; empty: an engine in this process.",
    )
    remote_api_key: str | None = Field(None, description="API key of the remote vLLM servers (their --api-key).")
    remote_adapter_dir: Path | None = Field(
        None,
        description="A folder the servers read, where the members are copied for them to load "
        "(default: beside the population, .NAME.remote-adapters).",
    )
    remote_adapter_dir_on_servers: Path | None = Field(
        None, description="remote_adapter_dir as the servers see it, where they mount it at another path."
    )
    remote_concurrency: int = Field(32, ge=1, description="Requests in flight per remote server.")

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_server_urls(v)


def check_domains(v: tuple[str, ...]) -> tuple[str, ...]:
    if not v:
        raise ValueError("at least one domain is needed")
    unknown = [d for d in v if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {sorted(DOMAINS)}")
    return v


def check_difficulties(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or any(d not in LEVELS for d in v):
        raise ValueError(f"difficulties must be a non-empty subset of {LEVELS[0]}..{LEVELS[-1]}, got {list(v)}")
    return v


def one_of(what: str, names: Iterable[str]) -> Callable[[str], str]:
    """A field validator: the value must be one of `names` (a registry's keys); a refusal lists them."""
    known = list(names)

    def check(v: str) -> str:
        if v not in known:
            raise ValueError(f"unknown {what} {v!r}; expected one of {known}")
        return v

    return check


def alternatives(names: Iterable[str]) -> str:
    """Names as a field description lists them: `a | b | c`."""
    return " | ".join(names)
