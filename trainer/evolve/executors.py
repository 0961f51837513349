"""The per-member work of a generation, as pure tasks that an executor can run anywhere.

Two tasks, each a plain function of plain data (adapter weights travel as
safetensors bytes, never as pickled tensors):

* :func:`train_member_task`: the gradient phase, PEFT LoRA fine-tuning of one
  member on verified chains;
* :func:`score_member_task`: one member as a judge: the mean token
  log-likelihood it gives to every chain (cross-evaluation), and its final
  hidden states and output-token distributions on a shared probe set
  (diversity).

Executors run a list of task calls and return their results in order:
:class:`LocalExecutor` in this process, :class:`RayExecutor` as Ray tasks.
Every task sets its own torch thread count and seeds from its arguments, so
both executors give bit-identical results.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemble_serve.shared.lora import load_lora, lora_from_bytes, lora_to_bytes, save_lora
from trainer.tasks.data import IGNORE, collate, encode_example, lr_at
from trainer.tasks.sandbox import Problem

Example = tuple[str, str]
"""(user prompt, assistant chain) of one training or scoring sequence."""


def _setup_torch(threads: int, seed: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # PEFT looks for the base's config under its recorded name (an identifier, not a path) when saving
    warnings.filterwarnings("ignore", message="Could not find a config file")

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def _load_peft(base: str, adapter: dict[str, Any], work: Path, trainable: bool):
    """The base model with the member's adapter, loaded the way PEFT loads any adapter folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = work / "adapter"
    save_lora(lora_from_bytes(adapter), folder)
    tok = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    return tok, model


def train_member_task(
    base: str,
    adapter: dict[str, Any],
    examples: Sequence[Example],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    threads: int,
) -> dict[str, Any]:
    """Fine-tune one member on `examples` for `steps` AdamW steps; returns its new weights and losses.

    Examples are visited in a seeded shuffled order (a new shuffle each pass), and
    the learning rate warms up over the first 10% of steps then decays (cosine):
    a fresh optimizer each generation, so a resumed run needs no optimizer state.
    """
    import torch

    if steps <= 0 or not examples:
        return {"adapter": adapter, "losses": [], "trained": False}
    _setup_torch(threads, seed)
    with tempfile.TemporaryDirectory(prefix="ensemble-train-") as work:
        tok, model = _load_peft(base, adapter, Path(work), trainable=True)
        max_len = model.base_model.model.config.max_position_embeddings
        encoded = [
            encode_example(tok, Problem(prompt=p, answer=None, chain=c, domain="chain", difficulty=0), max_len)
            for p, c in examples
        ]
        rng = random.Random(f"train:{seed}")
        order: list[int] = []
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        losses: list[float] = []
        for step in range(steps):
            batch_ids = []
            while len(batch_ids) < min(batch_size, len(encoded)):
                if not order:
                    order = list(range(len(encoded)))
                    rng.shuffle(order)
                batch_ids.append(order.pop())
            batch = collate([encoded[i] for i in batch_ids], tok.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, max(1, steps // 10))
            loss = model(**batch).loss
            if not torch.isfinite(loss):  # the task's own failure: a retry would give the same
                raise FloatingPointError(f"the training loss is {loss.item()} at step {step} of {steps}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(round(float(loss.item()), 5))
        out = Path(work) / "trained"
        model.save_pretrained(str(out))
        trained = load_lora(out)
        # keep the adapter config the member had (base name, modules); only the weights changed
        original = lora_from_bytes(adapter)
        new = original.with_factors(trained.factors, original.rank, original.alpha)
    return {"adapter": lora_to_bytes(new), "losses": losses, "trained": True}


def score_member_task(
    base: str,
    adapter: dict[str, Any],
    chains: Sequence[Example],
    probes: Sequence[Example],
    threads: int,
    batch_size: int = 32,
) -> dict[str, Any]:
    """One member as a judge and as a probe subject.

    Returns ``logprob``: for each of `chains`, the mean log-probability per token
    of the assistant turn under this member; ``hidden``: the final-layer hidden
    state at every assistant-turn token of `probes` (rows, concatenated);
    ``output``: the next-token distribution at the same positions.
    """
    import torch

    _setup_torch(threads, 0)
    with tempfile.TemporaryDirectory(prefix="ensemble-score-") as work:
        tok, model = _load_peft(base, adapter, Path(work), trainable=False)
        model.eval()
        max_len = model.base_model.model.config.max_position_embeddings

        def run(examples: Sequence[Example], want_states: bool):
            encoded = [
                encode_example(tok, Problem(prompt=p, answer=None, chain=c, domain="chain", difficulty=0), max_len)
                for p, c in examples
            ]
            scores: list[float] = []
            hidden: list[np.ndarray] = []
            output: list[np.ndarray] = []
            for start in range(0, len(encoded), batch_size):
                batch = collate(encoded[start : start + batch_size], tok.pad_token_id)
                with torch.no_grad():
                    out = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        output_hidden_states=want_states,
                    )
                logits = out.logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                mask = labels != IGNORE
                logp = torch.log_softmax(logits, dim=-1)
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
                counts = mask.sum(dim=1).clamp(min=1)
                scores.extend((picked.sum(dim=1) / counts).tolist())
                if want_states:
                    states = out.hidden_states[-1][:, :-1]
                    hidden.append(states[mask].numpy())
                    output.append(logp.exp()[mask].numpy())
            return scores, hidden, output

        logprob, _, _ = run(chains, False) if chains else ([], [], [])
        _, hidden, output = run(probes, True) if probes else ([], [], [])
    return {
        "logprob": logprob,
        "hidden": np.concatenate(hidden) if hidden else np.zeros((0, 0), dtype=np.float32),
        "output": np.concatenate(output) if output else np.zeros((0, 0), dtype=np.float32),
    }


class TaskFailed(RuntimeError):
    """A task failed for its own reasons (bad data, a NaN loss, a bug): retrying it would fail again."""


@dataclass(frozen=True)
class TaskError:
    """In place of a result (``errors="return"``): the task `call` (its index) of `task` failed with `error`."""

    task: str
    call: int
    error: str


def _failed(fn: Callable[..., Any], i: int, e: BaseException, errors: str) -> TaskError:
    if errors == "raise":
        raise TaskFailed(f"{fn.__name__} (task {i}) failed: {type(e).__name__}: {e}") from e
    return TaskError(fn.__name__, i, f"{type(e).__name__}: {e}")


class _Executor:
    """What every executor keeps: the tasks it ran again because their worker was lost."""

    def __init__(self) -> None:
        self.retried: list[dict[str, Any]] = []

    def take_retries(self) -> list[dict[str, Any]]:
        """The retries since the last call (and forget them)."""
        out, self.retried = self.retried, []
        return out


class LocalExecutor(_Executor):
    """Runs tasks one after another in this process (nothing to retry: a task here fails only for its own reasons)."""

    name = "local"

    def map(
        self,
        fn: Callable[..., Any],
        calls: Sequence[dict[str, Any]],
        on_done: Callable[[], None] | None = None,
        errors: str = "raise",
    ) -> list[Any]:
        """The results in order. A task that raises: :class:`TaskFailed`, or with ``errors="return"`` a
        :class:`TaskError` in its place."""
        results = []
        for i, kwargs in enumerate(calls):
            try:
                results.append(fn(**kwargs))
            except Exception as e:
                results.append(_failed(fn, i, e, errors))
            if on_done:
                on_done()
        return results

    def shutdown(self) -> None:
        pass


class RayExecutor(_Executor):
    """Runs tasks as Ray tasks on a cluster (`address`), or on a local Ray with `workers` CPUs.

    The base model is read from the same path on every node (a shared file system, or the same
    folder on each machine); adapters travel as bytes. Each task asks for `cpus` CPUs and `gpus` GPUs.

    A task whose worker or node is lost (the process crashed or was killed, the node died) is sent
    again with the same arguments, at most `max_retries` times: a task's result is a pure function of
    its arguments, so a retry gives what the lost attempt would have. Each retry is recorded in
    ``retried`` (the generation's history line says what was retried). A task that raises for its own
    reasons is not retried (see :meth:`map`).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None,
        workers: int,
        threads: int,
        max_retries: int = 3,
        cpus: float = 1.0,
        gpus: float = 0.0,
    ):
        super().__init__()
        try:
            import ray
        except ImportError:
            raise RuntimeError(
                "executor: ray needs Ray; install the `ray` extra (pip install 'ensemble-serve[ray]')"
            ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            env = {
                "env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            }
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, runtime_env=env, log_to_driver=False)
            self._started = True
        self._threads = threads
        self._max_retries, self._cpus, self._gpus = max_retries, cpus, gpus
        self._remote: dict[Callable[..., Any], Any] = {}
        # what Ray raises when the attempt, not the task, failed
        self._lost = (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OwnerDiedError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.LocalRayletDiedError,
        )

    def map(
        self,
        fn: Callable[..., Any],
        calls: Sequence[dict[str, Any]],
        on_done: Callable[[], None] | None = None,
        errors: str = "raise",
    ) -> list[Any]:
        """The results in order. A lost attempt is retried (above); a task that raises: :class:`TaskFailed`,
        or with ``errors="return"`` a :class:`TaskError` in its place. A task still lost after
        `max_retries` retries raises :class:`RuntimeError` whatever `errors` says (the cluster is failing)."""
        ray = self._ray
        remote = self._remote.get(fn)
        if remote is None:
            # Ray's own retries are off: this loop retries, so that it can count and record them
            remote = self._remote[fn] = ray.remote(num_cpus=self._cpus, num_gpus=self._gpus, max_retries=0)(fn)
        which = {remote.remote(**kwargs): i for i, kwargs in enumerate(calls)}
        results: list[Any] = [None] * len(calls)
        attempts = [1] * len(calls)
        pending = list(which)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = which.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except self._lost as e:
                    if attempts[i] > self._max_retries:
                        raise RuntimeError(
                            f"{fn.__name__} (task {i}): its worker was lost {attempts[i]} times "
                            f"(ray_max_retries {self._max_retries}); last: {type(e).__name__}"
                        ) from e
                    self.retried.append(
                        {"task": fn.__name__, "call": i, "attempt": attempts[i], "error": type(e).__name__}
                    )
                    attempts[i] += 1
                    again = remote.remote(**calls[i])
                    which[again] = i
                    pending.append(again)
                    continue
                except ray.exceptions.RayTaskError as e:
                    results[i] = _failed(fn, i, e.cause if e.cause is not None else e, errors)
                if on_done:
                    on_done()
        return results

    def shutdown(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_executor(
    kind: str,
    address: str | None = None,
    workers: int = 2,
    threads: int = 2,
    max_retries: int = 3,
    cpus: float = 1.0,
    gpus: float = 0.0,
):
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address, workers, threads, max_retries, cpus, gpus)
    raise ValueError(f"unknown executor {kind!r}; known: local, ray")
