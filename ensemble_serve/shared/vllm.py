"""The engine layer: vLLM with LoRA enabled and every population member registered.

The server and the trainer reach vLLM only through this module. One engine step
batches requests for different adapters together (multi-LoRA), so N members x k
chains cost about one batch. vLLM is imported lazily: the pure-Python parts of the
project (sandbox, manifest, voting) work without it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ensemble_serve.errors import ServiceUnavailableError
from ensemble_serve.shared.population import Population

if TYPE_CHECKING:  # pragma: no cover
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

# vLLM's accepted values for max_lora_rank; an adapter may have any rank up to it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineConfig(BaseModel):
    """Engine settings; names follow `vllm serve` flags where they overlap."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_loras: int | None = Field(None, ge=1, description="Adapters in one batch (default: all members, at most 16).")
    max_lora_rank: int | None = Field(
        None, description="Largest adapter rank (default: the smallest vLLM value >= the largest member rank)."
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept in host memory (default: max(max_loras, members))."
    )
    max_model_len: int | None = Field(None, ge=16, description="Context length (default: the model's).")
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="Memory fraction for vLLM (on the CPU backend, of NUMA node 0's memory)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallelism.")
    distributed_executor_backend: str | None = Field(None, description="vLLM executor backend: mp or ray.")
    dtype: str = Field("auto", description="Weights dtype (auto: float32 on CPU for the sandbox substrate).")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (fast start on CPU).")
    seed: int = Field(0, description="Engine sampling seed.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences scheduled per step.")


@dataclass
class AdapterRegistry:
    """Public member names -> `LoRARequest`s with monotonic integer ids.

    With `snapshot_root`, each member's adapter is first copied into a private folder
    of the server (named by the content's hash) and checked there, and vLLM loads
    that copy. vLLM reads adapter files lazily, and a corrupt file at that moment
    kills its engine core; a private, checked copy cannot change under it, whatever
    the trainer does to the population directory afterwards. A member keeps its id
    while its content is unchanged; new content gets a fresh id, so vLLM never
    confuses a reloaded member with its stale weights.
    """

    snapshot_root: Path | None = None
    keep_snapshots: int = 2  # per member: the current one and the one before (requests in flight)
    _by_name: dict[str, LoRARequest] = field(default_factory=dict)
    _digest: dict[str, str] = field(default_factory=dict)
    _snapshots: dict[str, list[Path]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, name: str, path: Path, base_model_name: str | None = None) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        digest = adapter_digest(path)
        with self._lock:
            current = self._by_name.get(name)
            if current is not None and self._digest.get(name) == digest:
                return current
        root = self.snapshot_root
        load_path = self._snapshot(root, name, Path(path), digest) if root is not None else Path(path)
        with self._lock:
            req = LoRARequest(name, next(self._ids), str(load_path), base_model_name=base_model_name)
            self._by_name[name] = req
            self._digest[name] = digest
            return req

    def _snapshot(self, root: Path, name: str, src: Path, digest: str) -> Path:
        dest = root / f"{name}-{digest[:16]}"
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in ADAPTER_FILES:
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / f)
            if adapter_digest(tmp) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ValueError(f"adapter {src} changed while it was being loaded; try again")
            check_adapter_weights(tmp / "adapter_model.safetensors")
            tmp.rename(dest)
        kept = self._snapshots.setdefault(name, [])
        if dest not in kept:
            kept.append(dest)
        while len(kept) > self.keep_snapshots:
            shutil.rmtree(kept.pop(0), ignore_errors=True)
        return dest

    def forget(self, name: str) -> None:
        """Drop `name` and delete its private snapshots (new requests for it get a KeyError)."""
        with self._lock:
            self._by_name.pop(name, None)
            self._digest.pop(name, None)
            gone = self._snapshots.pop(name, [])
        for folder in gone:
            shutil.rmtree(folder, ignore_errors=True)

    def sync(self, population: Population) -> None:
        """Register every member of `population` and forget names it no longer has."""
        names = set(population.names)
        with self._lock:
            for gone in set(self._by_name) - names:
                del self._by_name[gone]
                self._digest.pop(gone, None)
        for name in population.names:
            self.register(name, population.member_dir(name), population.manifest.base_model.name)

    def get(self, name: str) -> LoRARequest:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown member {name!r}; known: {sorted(self._by_name)}") from None

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def requests(self) -> list[LoRARequest]:
        with self._lock:
            return list(self._by_name.values())


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_digest(folder: Path) -> str:
    """sha256 over an adapter folder's config and weights."""
    h = hashlib.sha256()
    for f in ADAPTER_FILES:
        h.update(f.encode())
        with open(Path(folder) / f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_adapter_weights(path: Path) -> None:
    """Open and read every tensor of a safetensors file (what vLLM would do), or raise ValueError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:
        raise ValueError(f"{path}: unreadable adapter weights: {e}") from None


def default_lora_rank(population: Population) -> int:
    biggest = max(m.rank for m in population.manifest.members)
    for r in VLLM_LORA_RANKS:
        if r >= biggest:
            return r
    raise ValueError(f"member rank {biggest} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def engine_kwargs(population: Population, cfg: EngineConfig) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `AsyncEngineArgs` serving `population`."""
    if population.base_model_path is None and population.manifest.base_model.hub_id is None:
        raise ValueError(f"population {population.root} names no base model path or hub id")
    model = str(population.base_model_path or population.manifest.base_model.hub_id)
    n = len(population.manifest.members)
    max_loras = cfg.max_loras or min(n, 16)
    rank = cfg.max_lora_rank or default_lora_rank(population)
    if rank not in VLLM_LORA_RANKS:
        raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {rank}")
    too_big = [m.name for m in population.manifest.members if m.rank > rank]
    if too_big:
        raise ValueError(f"members {too_big} have rank above max_lora_rank={rank}")
    kw: dict[str, Any] = dict(
        model=model,
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=rank,
        max_cpu_loras=cfg.max_cpu_loras or max(max_loras, n),
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        dtype=_dtype(cfg.dtype),
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        max_num_seqs=cfg.max_num_seqs,
    )
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    if _on_cpu():
        # vLLM's CPU sampler dies ("CPU Generator does not use offset", then EngineDeadError)
        # on a seeded request whose prefill is split over engine steps; whole-prompt
        # scheduling means a client's `seed` can never take the engine down.
        kw["enable_chunked_prefill"] = False
    if cfg.distributed_executor_backend:
        kw["distributed_executor_backend"] = cfg.distributed_executor_backend
    return kw


def _dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    # The CPU backend runs float32 reliably; on CUDA let vLLM pick from the config.
    return "float32" if _on_cpu() else "auto"


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


@dataclass(frozen=True)
class Generation:
    """One finished chain: the text, its token count and why it stopped."""

    member: str | None
    text: str
    tokens: int
    finish_reason: str | None


def _no_vllm(e: ModuleNotFoundError) -> Exception:
    """vLLM itself missing: name the extra that brings it (any other missing module: the error as it is)."""
    if e.name != "vllm":
        return e
    return RuntimeError(
        "vLLM is not installed: install the `cpu` extra (pip install 'ensemble-serve[cpu]'), "
        "or the `cuda` extra on a CUDA machine"
    )


class OfflineEngine:
    """A synchronous vLLM engine over one population, for batch work (evaluation, self-play).

    Every member is a `LoRARequest`; `generate` puts all requests, whatever their
    adapters, into one `LLM.generate` call so vLLM batches them in the same steps.
    """

    def __init__(self, population: Population, cfg: EngineConfig | None = None, snapshot_root: Path | None = None):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        try:
            from vllm import LLM
        except ModuleNotFoundError as e:
            raise _no_vllm(e) from None

        self.population = population
        self.cfg = cfg or EngineConfig()
        # with snapshot_root, vLLM loads private copies: the population may change under a long-lived engine
        self.registry = AdapterRegistry(snapshot_root=snapshot_root)
        self.registry.sync(population)
        self.llm: LLM = LLM(**engine_kwargs(population, self.cfg))
        self.tokenizer = self.llm.get_tokenizer()

    def chat_prompt(self, user_message: str) -> str:
        """The base model's chat template applied to one user turn."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    def generate(
        self,
        prompts: Sequence[str],
        members: Sequence[str | None],
        params: SamplingParams | Sequence[SamplingParams],
        progress: bool = False,
    ) -> list[list[Generation]]:
        """Generate for each (prompt, member) pair in one multi-LoRA batch.

        `members[i]` is a member name, or None for the base model. Returns, for each
        pair, its `n` completions.
        """
        if len(prompts) != len(members):
            raise ValueError(f"{len(prompts)} prompts but {len(members)} members")
        loras = [None if m is None else self.registry.get(m) for m in members]
        outputs = self.llm.generate(list(prompts), params, lora_request=loras, use_tqdm=progress)
        return [
            [Generation(m, c.text, len(c.token_ids), c.finish_reason) for c in out.outputs]
            for m, out in zip(members, outputs)
        ]


class ScoringGate:
    """Keeps prompt-logprob scoring alone in the engine.

    vLLM's CPU backend crashes its engine core when a request with `prompt_logprobs`
    under a LoRA adapter shares an engine step with any other request: its LoRA
    logits path indexes adapters per request while the prompt logits have a row per
    prompt token (`einsum(): subscript b has size 2 ...`, then `EngineDeadError`).
    With a single request in the step the index broadcasts and all is well. So every
    engine request goes through this gate: generation holds it shared; scoring holds
    it exclusively and sends its requests one at a time. While scoring waits for
    in-flight generation to drain, new generation waits too (writer preference), so
    scoring cannot starve.
    """

    def __init__(self) -> None:
        import asyncio

        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    async def acquire_shared(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1

    async def release_shared(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_exclusive(self) -> None:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True

    async def release_exclusive(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()

    @property
    def state(self) -> tuple[int, bool]:
        """(generation requests inside, scoring inside): for tests and metrics."""
        return self._readers, self._writer


class AsyncEngine:
    """vLLM's `AsyncLLM` over one population, for the server.

    Requests are token-id prompts with a member name (or None for the base model).
    Cancelling the iteration of `generate` aborts the request inside vLLM.
    Scoring with prompt logprobs runs through `ScoringGate`, one adapter at a time.
    """

    def __init__(self, population: Population, cfg: EngineConfig | None = None):
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ModuleNotFoundError as e:
            raise _no_vllm(e) from None

        self.cfg = cfg or EngineConfig()
        self.population = population
        self._snapshot_dir = Path(tempfile.mkdtemp(prefix="ensemble-serve-adapters-"))
        self.registry = AdapterRegistry(snapshot_root=self._snapshot_dir)
        self.registry.sync(population)
        self._extras: OrderedDict[str, None] = OrderedDict()  # registered non-members, least recently used first
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(population, self.cfg)))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len: int = self.llm.model_config.max_model_len
        self.gate = ScoringGate()
        self._ids = itertools.count()

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def set_population(self, population: Population) -> None:
        """Serve `population` from now on; requests in flight keep the adapters they started with."""
        if population.manifest.base_model.sha256 != self.population.manifest.base_model.sha256 or (
            population.base_model_path != self.population.base_model_path
        ):
            raise ValueError(
                f"{population.root}: the base model changed; a new base model needs a restart of the server"
            )
        too_big = [
            m.name for m in population.manifest.members if m.rank > self.llm.vllm_config.lora_config.max_lora_rank
        ]
        if too_big:
            raise ValueError(
                f"{population.root}: members {too_big} exceed the engine's max_lora_rank; restart with a larger one"
            )
        self.registry.sync(population)
        self.population = population

    async def generate(self, prompt_ids: list[int], params: SamplingParams, member: str | None, request_id: str):
        """Stream `RequestOutput`s (cumulative) for one request."""
        from vllm.v1.engine.exceptions import EngineDeadError

        lora = None if member is None else self.registry.get(member)
        await self.gate.acquire_shared()
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora):
                yield out
        except EngineDeadError:
            raise ServiceUnavailableError("the engine is not running (it died; see the server log)") from None
        finally:
            await self.gate.release_shared()

    async def score(self, prompt_ids: list[int], continuations: Sequence[list[int]], member: str | None) -> list[float]:
        """Log-likelihood (summed token log-probabilities) of each continuation after the prompt, under one member.

        Uses vLLM's prompt logprobs with the engine to itself, one request at a time
        (see `ScoringGate`): each request is one prefill of prompt + continuation.
        """
        from vllm import SamplingParams

        lora = None if member is None else self.registry.get(member)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        n = len(prompt_ids)

        async def one(cont: list[int]) -> float:
            ids = list(prompt_ids) + list(cont)
            last = None
            async for out in self.llm.generate(
                {"prompt_token_ids": ids}, params, self.next_id("score"), lora_request=lora
            ):
                last = out
            lps = last.prompt_logprobs if last is not None else None
            if not lps or not cont:
                return float("-inf")
            total = 0.0
            for pos in range(n, len(ids)):
                entry = lps[pos]
                total += entry[ids[pos]].logprob if entry and ids[pos] in entry else float("-inf")
            return total

        await self.gate.acquire_exclusive()
        try:
            return [await one(c) for c in continuations]  # never two in one engine step
        finally:
            await self.gate.release_exclusive()

    @property
    def max_lora_rank(self) -> int:
        return self.llm.vllm_config.lora_config.max_lora_rank

    def register_extra(self, name: str, folder: Path, keep: int | None = None) -> None:
        """Serve an adapter that is not a member (a routed mixture) under `name` until the next refresh.

        With `keep`, at most that many extras stay registered: the least recently used is forgotten
        (its private snapshot deleted), so a server answering many distinct routes does not grow.
        """
        if name not in self.registry.names():
            self.registry.register(name, folder, self.population.manifest.base_model.name)
        self._extras[name] = None
        self._extras.move_to_end(name)
        while keep is not None and len(self._extras) > keep:
            old, _ = self._extras.popitem(last=False)
            self.registry.forget(old)

    async def check_health(self) -> None:
        await self.llm.check_health()

    @property
    def errored(self) -> bool:
        return self.llm.errored

    def unavailable_members(self) -> list[str]:
        """Members that cannot answer now: all of them once the engine has died, else none."""
        return list(self.population.names) if self.errored else []

    def health(self) -> dict[str, Any]:
        """Details for `/health`: the in-process engine has no servers to report."""
        return {"engine": "dead" if self.errored else "running"}

    async def warm(self) -> None:
        """Load every registered adapter into vLLM now rather than at its first request."""
        for req in self.registry.requests():
            await self.llm.add_lora(req)

    def shutdown(self) -> None:
        self.llm.shutdown()
        shutil.rmtree(self._snapshot_dir, ignore_errors=True)
