"""Edit hyperparameters: one frozen dataclass, every field settable from the CLI."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from typing import Any

PIPELINES = ("bf", "df")
OBJECTIVES = ("ft-m", "ft-l")
SCHEDULES = ("constant", "cosine")
ON_BAD_RECORD = ("error", "skip")
NULL_SPACE_MODES = ("hard", "soft")
NULL_SPACE_SCOPES = ("all", "subject")
RETAIN_LOSSES = ("ce", "kl")


@dataclasses.dataclass(frozen=True)
class EditConfig:
    """LocFT-BF hyperparameters. Defaults are the reference code's (Llama-3-8B preset but bs 100 → 16).

    ``layers``: layer indices (negative counts from the top); ``None`` puts the reference's
    Llama-3-8B layer (22 of 32) at the same relative depth. ``module``: what trains in each.
    ``skip_step_loss``: skip a step whose batch loss is below it; ``early_stop_loss``: stop when an
    epoch's mean loss is below it (0 disables either; depth-first: a request's steps stop once its
    loss is below it, and the next request starts). ``norm_constraint``: FT-M's L∞ bound on the
    change of each trained weight (0 = off; depth-first, as EasyEdit's sequential FT: on each
    request's change, around the weights it started from). ``prefix_cache``: exact cache of the
    frozen layers below.
    ``prefix_cache_device_bytes``: the largest cache kept on device, else it stays on the host (None:
    half an accelerator's free memory, 2 GiB on CPU; ``prefix_cache.device_budget``).
    ``packing``: lay a batch's requests end to end in a few rows instead of one padded row each
    (breadth-first only; the same loss, less padding; see ``packing``).
    ``retain_weight``: loss weight of the retain rows passed to ``edit(..., retain=...)``.
    ``retain_loss``: ``ce`` (cross-entropy towards the unedited model's greedy answer) or ``kl``
    (KL divergence from its whole next-token distribution at each answer position; ``retain_kl``).
    ``early_stop_reliability``: every ``check_every`` epochs, greedy-decode a fixed sample of up to
    64 edit prompts and stop once this share answers the new target exactly (0 = off).
    ``null_space_tol``: project every update onto the null space of the edited tensors' inputs on
    the ``preserve`` texts and retain rows, dropping eigen-directions above ``tol × λ_max`` (0 = off).
    ``null_space_mode``: ``hard`` (that projection) or ``soft`` (damp each eigen-direction of the
    inputs by ``tol / (λ/λ_max + tol)`` instead: ROME/MEMIT's ``C⁻¹`` key whitening; see ``null_space``).
    ``null_space_scope``: ``all`` (only the preserved texts and retain rows) or ``subject`` (also
    every edit prompt's own tokens but its subject, and the subject tokens of
    ``edit(..., preserve_subjects=...)``: the update then acts through the subject only; every
    request needs a ``subject`` that occurs in its prompt).
    ``head_chunk``: the train step's LM head runs over the vocabulary in chunks of this many rows,
    forming the loss and its gradient in one pass over the head weight (``head_loss``); 0 = plain
    logits and log-softmax. Plain whenever the head weight is split over the model axis.
    """

    layers: tuple[int, ...] | None = None
    module: str = "mlp_down"
    lr: float = 5e-4
    epochs: int = 25
    batch_size: int = 16
    pipeline: str = "bf"
    objective: str = "ft-m"
    skip_step_loss: float = 1e-2
    early_stop_loss: float = 1e-2
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0
    norm_constraint: float = 0.0
    seed: int = 0
    prefix_cache: bool = True
    packing: bool = True
    prefix_cache_device_bytes: int | None = None
    max_length: int = 256
    on_bad_record: str = "error"
    model_parallel: int = 1
    retain_weight: float = 1.0
    retain_loss: str = "ce"
    early_stop_reliability: float = 0.0
    check_every: int = 5
    null_space_tol: float = 0.0
    null_space_mode: str = "hard"
    null_space_scope: str = "all"
    head_chunk: int = 2048

    def __post_init__(self) -> None:
        self._check_types()
        for name, allowed in (
            ("pipeline", PIPELINES),
            ("objective", OBJECTIVES),
            ("schedule", SCHEDULES),
            ("on_bad_record", ON_BAD_RECORD),
            ("null_space_mode", NULL_SPACE_MODES),
            ("null_space_scope", NULL_SPACE_SCOPES),
            ("retain_loss", RETAIN_LOSSES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"EditConfig.{name}={getattr(self, name)!r}; valid: {', '.join(allowed)}")
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            object.__setattr__(self, "layers", (self.layers,))
        elif self.layers is not None:
            listed = isinstance(self.layers, Iterable) and not isinstance(self.layers, str | bytes)
            if not listed or not all(_is_int(x) for x in self.layers):
                raise ValueError(f"EditConfig.layers must be an int or a list of ints, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        for name in ("epochs", "batch_size", "max_length", "model_parallel", "check_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EditConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.head_chunk) < 0:
            raise ValueError(f"EditConfig.head_chunk must be >= 0 (0 = plain head), got {self.head_chunk!r}")
        for name in ("seed", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"EditConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.prefix_cache_device_bytes is not None and int(self.prefix_cache_device_bytes) < 0:
            raise ValueError(f"EditConfig.prefix_cache_device_bytes must be >= 0 or None, "
                             f"got {self.prefix_cache_device_bytes!r}")
        # an infinite lr trains non-finite weights from a finite loss; below 0 a clip, bound, threshold
        # or tolerance would silently mean off, and a retain weight gradient ascent
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"EditConfig.lr must be a finite number > 0, got {self.lr!r}")
        for name in ("skip_step_loss", "early_stop_loss", "grad_clip", "norm_constraint", "retain_weight",
                     "null_space_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"EditConfig.{name} must be a finite number >= 0 (0 = off), got {value!r}")
        if not 0 <= self.early_stop_reliability <= 1:
            raise ValueError(f"EditConfig.early_stop_reliability must be between 0 and 1 (0 = off), "
                             f"got {self.early_stop_reliability!r}")

    def _check_types(self) -> None:
        """Each field holds its default's kind of value (a string where a number belongs is named here,
        not met later as a TypeError deep in the run)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "layers" or (value is None and f.default is None):
                continue
            kind = int if f.default is None else type(f.default)  # None default: prefix_cache_device_bytes
            if kind is bool:
                ok, what = isinstance(value, bool), "True or False"
            elif kind is float:
                ok, what = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
            elif kind is int:
                ok, what = _is_int(value), "an integer"
            else:
                ok, what = isinstance(value, kind), f"a {kind.__name__}"
            if not ok:
                raise ValueError(f"EditConfig.{f.name} must be {what}, got {value!r}")

    def replace(self, **changes: Any) -> EditConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EditConfig fields {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers too
