"""LoRA adapter weights as plain tensors: load, save, ship between processes, refactor.

It lives on the serving side because both halves need it: the server mixes members' updates
into one routed adapter, and the trainer's evolutionary operators (`trainer.evolve.operators`) work
on the *update* a LoRA adapter makes to each base weight, dW = scale * B @ A, rather than on the factors A and B themselves: the factors
of one update are far from unique (B R, R^-1 A gives the same dW for any invertible R), so
averaging or mixing factors of independently trained adapters mixes arbitrary rotations. This
module provides the representation (`LoraWeights`), the PEFT folder format (`load_lora`,
`save_lora`), a pickle-free wire format for Ray (`lora_to_bytes`, `lora_from_bytes`), a
compatibility check for a population, and the way back from an update to factors of a chosen
rank (`refactor`, `refactor_low_rank`).

Only plain LoRA is supported: per-module ranks or alphas (`rank_pattern`, `alpha_pattern`),
DoRA and trained embedding/bias extras change what the update means, so such adapters are
refused with `LoraError` instead of being silently mis-read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
# PEFT writes this metadata itself; keeping it makes our files indistinguishable from PEFT's.
SAFETENSORS_METADATA = {"format": "pt"}

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class LoraError(ValueError):
    """An adapter folder, payload or set of adapters that cannot be used as plain LoRA weights."""


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """The weights of one PEFT LoRA adapter.

    `factors` maps a module prefix (the safetensors key without `.lora_A.weight`) to its
    (A, B) pair, A of shape (rank, in_features) and B of shape (out_features, rank). Factors are
    normalised to contiguous float32 on construction, so every operator sees one dtype and the
    saved files are the same whatever precision the adapter was trained in. The dataclass is
    frozen and operators never write into tensors in place; do not mutate `factors` either, as
    copies made by operators may share tensors with their source.

    `config` is the adapter_config.json content; its `r` and `lora_alpha` must agree with `rank`
    and `alpha` (use `with_factors` to change them together).

    Equality is identity (`eq=False`): a generated `==` would compare tensors, which have no
    single truth value; compare factors with `torch.equal` instead.
    """

    rank: int
    alpha: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(float(self.alpha)) or float(self.alpha) <= 0:
            raise LoraError(f"lora_alpha must be a positive finite number, got {self.alpha!r}")
        if "r" in self.config and self.config["r"] != self.rank:
            raise LoraError(f"config r={self.config['r']!r} disagrees with rank={self.rank}")
        if "lora_alpha" in self.config and float(self.config["lora_alpha"]) != float(self.alpha):
            raise LoraError(f"config lora_alpha={self.config['lora_alpha']!r} disagrees with alpha={self.alpha}")
        if not self.factors:
            raise LoraError("a LoRA adapter needs at least one module")
        normalised: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in sorted(self.factors):
            a, b = self.factors[module]
            _check_pair(module, a, b, self.rank, source="factors")
            normalised[module] = (_as_f32(a), _as_f32(b))
        object.__setattr__(self, "factors", normalised)
        object.__setattr__(self, "config", dict(self.config))

    @property
    def scale(self) -> float:
        """The factor PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
        return lora_scale(float(self.alpha), self.rank, bool(self.config.get("use_rslora", False)))

    def modules(self) -> list[str]:
        """Module prefixes in sorted order, the order every operator visits them in (for determinism)."""
        return sorted(self.factors)

    def delta(self, module: str) -> torch.Tensor:
        """The update this adapter adds to the module's base weight: scale * B @ A, shape (out, in)."""
        a, b = self._pair(module)
        return self.scale * (b @ a)

    def shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a module, the part of its shape that does not depend on rank."""
        a, b = self._pair(module)
        return int(a.shape[1]), int(b.shape[0])

    @staticmethod
    def layer_of(module: str) -> int | None:
        """The transformer layer index in a module prefix (`...layers.<i>....`), or None (e.g. lm_head)."""
        match = _LAYER_RE.search(module)
        return int(match.group(1)) if match else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's key names, ready for `safetensors.torch.save_file`."""
        out: dict[str, torch.Tensor] = {}
        for module in self.modules():
            a, b = self.factors[module]
            out[module + A_SUFFIX] = a.contiguous()
            out[module + B_SUFFIX] = b.contiguous()
        return out

    def with_factors(
        self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float
    ) -> LoraWeights:
        """A new adapter with these factors and this rank/alpha, the rest of the config kept.

        Integral alphas are written as ints, as PEFT and vLLM configs usually carry them.
        """
        config = dict(self.config)
        config["r"] = int(rank)
        config["lora_alpha"] = int(alpha) if float(alpha).is_integer() else float(alpha)
        return LoraWeights(rank=int(rank), alpha=float(alpha), factors=dict(factors), config=config)

    def _pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.factors[module]
        except KeyError:
            raise LoraError(f"module {module!r} is not in this adapter") from None


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(dtype=torch.float32, device="cpu").contiguous()


def _check_pair(module: str, a: torch.Tensor, b: torch.Tensor, rank: int, source: str) -> None:
    """Refuse factors whose shapes do not fit a rank-`rank` LoRA pair (caught at load, not at merge time)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise LoraError(f"{source}: module {module!r}: factors must be tensors")
    if a.ndim != 2 or b.ndim != 2:
        raise LoraError(
            f"{source}: module {module!r}: lora_A and lora_B must be 2-D, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[0] != rank:
        raise LoraError(
            f"{source}: module {module!r}: lora_A has shape {tuple(a.shape)}, expected ({rank}, in) for r={rank}"
        )
    if b.shape[1] != rank:
        raise LoraError(
            f"{source}: module {module!r}: lora_B has shape {tuple(b.shape)}, expected (out, {rank}) for r={rank}"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise LoraError(f"{source}: module {module!r}: factors must be floating point, got {a.dtype}, {b.dtype}")


def _check_config(config: Any, source: str) -> tuple[int, float]:
    """The (r, lora_alpha) of a plain LoRA config, refusing the variants whose update is not scale * B @ A."""
    if not isinstance(config, dict):
        raise LoraError(f"{source}: adapter config must be a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"{source}: peft_type is {peft_type!r}, only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise LoraError(f"{source}: adapter config has no {key!r}")
    r, alpha = config["r"], config["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoraError(f"{source}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraError(f"{source}: lora_alpha must be a positive number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LoraError(f"{source}: per-module {key} is not supported (every module must share r and lora_alpha)")
    if config.get("use_dora"):
        raise LoraError(f"{source}: DoRA adapters (use_dora) are not supported")
    return r, float(alpha)


def _from_tensors(config: dict[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> LoraWeights:
    """Pair up PEFT's lora_A / lora_B keys and validate them against the config."""
    r, alpha = _check_config(config, source)
    a_of: dict[str, torch.Tensor] = {}
    b_of: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith(A_SUFFIX):
            a_of[key[: -len(A_SUFFIX)]] = tensor
        elif key.endswith(B_SUFFIX):
            b_of[key[: -len(B_SUFFIX)]] = tensor
        else:
            raise LoraError(f"{source}: unsupported tensor {key!r} (only {A_SUFFIX} / {B_SUFFIX} pairs are handled)")
    for module in sorted(a_of.keys() - b_of.keys()):
        raise LoraError(f"{source}: module {module!r} has lora_A but no lora_B")
    for module in sorted(b_of.keys() - a_of.keys()):
        raise LoraError(f"{source}: module {module!r} has lora_B but no lora_A")
    if not a_of:
        raise LoraError(f"{source}: no LoRA tensors found")
    for module in sorted(a_of):
        _check_pair(module, a_of[module], b_of[module], r, source)
    factors = {m: (a_of[m], b_of[m]) for m in a_of}
    return LoraWeights(rank=r, alpha=alpha, factors=factors, config=dict(config))


def load_lora(folder: str | Path) -> LoraWeights:
    """Read a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    Only safetensors is read: a pickled `adapter_model.bin` can execute code on load.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise LoraError(f"{config_path}: missing adapter config")
    if not weights_path.is_file():
        hint = (
            " (only safetensors is read; re-save the adapter with safe_serialization)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise LoraError(f"{weights_path}: missing adapter weights{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{config_path}: unreadable adapter config: {e}") from e
    try:
        tensors = safetensors.torch.load_file(str(weights_path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise LoraError(f"{weights_path}: unreadable safetensors file: {e}") from e
    return _from_tensors(config, tensors, str(weights_path))


def save_lora(weights: LoraWeights, folder: str | Path) -> Path:
    """Write `weights` as a PEFT adapter folder and return it.

    The folder must not exist or be empty, so an adapter is never half-overwritten. The output
    is byte-deterministic (sorted JSON keys, contiguous float32 tensors, fixed metadata), so a
    population's files can be compared and content-addressed.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise LoraError(f"{folder}: exists and is not a folder")
        if any(folder.iterdir()):
            raise LoraError(f"{folder}: not empty; refusing to overwrite an adapter")
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(weights.state_dict(), str(folder / WEIGHTS_FILE), metadata=SAFETENSORS_METADATA)
    (folder / CONFIG_FILE).write_text(json.dumps(weights.config, indent=2, sort_keys=True) + "\n")
    return folder


def lora_to_bytes(weights: LoraWeights) -> dict[str, Any]:
    """A pickle-free payload (JSON-able config + safetensors bytes) for sending weights between processes."""
    return {
        "config": json.loads(json.dumps(weights.config)),
        "safetensors": safetensors.torch.save(weights.state_dict(), metadata=SAFETENSORS_METADATA),
    }


def lora_from_bytes(payload: Mapping[str, Any]) -> LoraWeights:
    """The inverse of `lora_to_bytes`, with the same validation as `load_lora`."""
    if not isinstance(payload, Mapping) or "config" not in payload or "safetensors" not in payload:
        raise LoraError("LoRA payload must be a mapping with 'config' and 'safetensors' keys")
    blob = payload["safetensors"]
    if not isinstance(blob, bytes | bytearray):
        raise LoraError("LoRA payload 'safetensors' must be bytes")
    try:
        tensors = safetensors.torch.load(bytes(blob))
    except Exception as e:
        raise LoraError(f"LoRA payload: unreadable safetensors bytes: {e}") from e
    return _from_tensors(dict(payload["config"]), tensors, "LoRA payload")


def _groups(values: Sequence[Any], names: Sequence[str]) -> str:
    """'value (a, b) vs value (c)': who disagrees with whom, for error messages."""
    order: list[Any] = []
    members: dict[Any, list[str]] = {}
    for value, name in zip(values, names):
        if value not in members:
            order.append(value)
            members[value] = []
        members[value].append(name)
    return " vs ".join(f"{_show(v)} ({', '.join(members[v])})" for v in order)


def _show(value: Any) -> str:
    if isinstance(value, frozenset):
        return "[" + ", ".join(sorted(map(str, value))) + "]"
    if isinstance(value, tuple):
        return "{" + ", ".join(f"{m}: in={i} out={o}" for m, (i, o) in value) + "}"
    return repr(value)


def check_compatible(weights: Sequence[LoraWeights], names: Sequence[str]) -> None:
    """Refuse a set of adapters that cannot be combined module by module.

    They must target the same base model, the same target_modules and the same module prefixes
    with the same (in, out) shapes; ranks and alphas may differ (operators work on updates). The
    error names which members hold which value.
    """
    if len(weights) != len(names):
        raise LoraError(f"{len(weights)} adapters but {len(names)} names")
    if len(weights) < 2:
        return
    bases = [w.config.get("base_model_name_or_path") for w in weights]
    if len(set(bases)) > 1:
        raise LoraError(f"adapters disagree on base_model_name_or_path: {_groups(bases, names)}")
    targets = [_target_set(w.config.get("target_modules")) for w in weights]
    if len(set(targets)) > 1:
        raise LoraError(f"adapters disagree on target_modules: {_groups(targets, names)}")
    prefixes = [frozenset(w.factors) for w in weights]
    if len(set(prefixes)) > 1:
        ref = prefixes[0]
        diffs = [
            f"{name}: missing {sorted(ref - p)[:3]}, extra {sorted(p - ref)[:3]}"
            for name, p in zip(names, prefixes)
            if p != ref
        ]
        raise LoraError(f"adapters disagree on LoRA modules (compared with {names[0]}): " + "; ".join(diffs))
    shapes = [tuple((m, w.shape(m)) for m in w.modules()) for w in weights]
    if len(set(shapes)) > 1:
        bad = [m for m in weights[0].modules() if len({w.shape(m) for w in weights}) > 1]
        per = [tuple((m, w.shape(m)) for m in bad[:3]) for w in weights]
        raise LoraError(f"adapters disagree on module shapes (in, out): {_groups(per, names)}")


def align_modules(weights: Sequence[LoraWeights], names: Sequence[str]) -> list[LoraWeights]:
    """The adapters over one set of modules, so that adapters trained on different targets combine.

    Adapters brought from elsewhere often differ in `target_modules` (q,v in one, every linear
    layer in another). A module an adapter does not target is an update of zero, so each adapter
    gets the union of the modules, the missing ones as zero factors of its own rank, and the
    union as its `target_modules`; its update is unchanged everywhere. Adapters that already
    agree are returned as they are. Adapters of other bases, or whose shared modules differ in
    shape, are refused (`LoraError`, naming them), since no alignment can combine those.
    """
    weights = list(weights)
    if len(weights) != len(names):
        raise LoraError(f"{len(weights)} adapters but {len(names)} names")
    if len({frozenset(w.factors) for w in weights}) <= 1:
        return weights
    bases = [w.config.get("base_model_name_or_path") for w in weights]
    if len(set(bases)) > 1:
        raise LoraError(f"adapters disagree on base_model_name_or_path: {_groups(bases, names)}")
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for w, name in zip(weights, names):
        for module in w.modules():
            shape = w.shape(module)
            seen = shapes.setdefault(module, (shape, name))
            if seen[0] != shape:
                raise LoraError(
                    f"adapters disagree on the shape (in, out) of {module}: {seen[0]} ({seen[1]}) vs {shape} ({name})"
                )
    union = sorted(shapes)
    targets = sorted({module.rsplit(".", 1)[-1] for module in union})
    aligned = []
    for w in weights:
        factors = dict(w.factors)
        for module in union:
            if module not in factors:
                (n_in, n_out) = shapes[module][0]
                factors[module] = (torch.zeros(w.rank, n_in), torch.zeros(n_out, w.rank))
        config = {**w.config, "target_modules": targets}
        aligned.append(LoraWeights(rank=w.rank, alpha=w.alpha, factors=factors, config=config))
    return aligned


def _target_set(target: Any) -> Any:
    """target_modules as a comparable value: a set of names, or the regex string PEFT also accepts."""
    if isinstance(target, list | tuple | set | frozenset):
        return frozenset(str(t) for t in target)
    return target


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each singular pair's sign canonical: the largest-magnitude entry of each U column positive.

    SVD only defines (u_j, v_j) up to a joint sign; without this the same update could be
    refactored differently on another run or library version.
    """
    if u.shape[1] == 0:
        return u, vh
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs.unsqueeze(0), vh * signs.unsqueeze(1)


def _factors_from_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, alpha: float, use_rslora: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the top-`rank` triplets into (A, B) with scale * B @ A = U_k S_k Vh_k, zero-padded to `rank`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"refactor rank must be a positive integer, got {rank!r}")
    if not math.isfinite(float(alpha)) or alpha <= 0:
        raise LoraError(f"refactor alpha must be positive, got {alpha!r}")
    u, vh = _fix_signs(u, vh)
    k = min(rank, s.shape[0])
    root = torch.sqrt(s[:k].clamp_min(0) / lora_scale(float(alpha), rank, use_rslora))
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a[:k] = root.unsqueeze(1) * vh[:k]
    b[:, :k] = u[:, :k] * root.unsqueeze(0)
    return a.float().contiguous(), b.float().contiguous()


def refactor(
    delta: torch.Tensor, rank: int, alpha: float, *, use_rslora: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (A, B) of a target update, by truncated SVD (Eckart-Young).

    `(alpha / rank) * B @ A` (alpha / sqrt(rank) with `use_rslora`) equals the SVD truncation of
    `delta`; singular values are split as square roots between A and B so neither factor
    dominates further training. If `rank` exceeds the matrix's rank the extra components are
    zero. Computed in float64 so the truncation error, not rounding, is what remains.
    """
    if delta.ndim != 2:
        raise LoraError(f"refactor needs a 2-D update, got shape {tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    return _factors_from_svd(u, s, vh, rank, alpha, use_rslora)


def svd_low_rank(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of B @ A without forming it, in float64, signs canonical.

    QR of both factors reduces the problem to the SVD of a small (R x R) core, so an update of a
    4096 x 4096 module costs O((out + in) R^2) instead of a dense 4096^2 SVD. At most
    min(out, in, R) triplets come back (the rest are zero by construction).
    """
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise LoraError(f"svd_low_rank needs B (out, R) and A (R, in), got {tuple(b.shape)}, {tuple(a.shape)}")
    qb, rb = torch.linalg.qr(b.detach().to(torch.float64), mode="reduced")
    qa, ra = torch.linalg.qr(a.detach().to(torch.float64).T, mode="reduced")
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    u, vh = _fix_signs(qb @ uc, vch @ qa.T)
    return u, s, vh


def refactor_low_rank(
    b: torch.Tensor, a: torch.Tensor, rank: int, alpha: float, *, use_rslora: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`refactor(b @ a, ...)` without forming the dense update (see `svd_low_rank`)."""
    u, s, vh = svd_low_rank(b, a)
    return _factors_from_svd(u, s, vh, rank, alpha, use_rslora)
