"""Bootstrap 95% intervals over independent units (held-out sequences, probe examples, words).

Rows of one sequence are not independent, so every interval of the evaluation resamples whole
units (a cluster bootstrap): per-unit sums are kept, B resamples of the units with replacement are
drawn as multinomial counts from a fixed seed, every figure is recomputed from the resampled sums,
and the interval is the 2.5th and 97.5th percentile of the B values (percentile bootstrap).
Figures that are ratios of sums (FVU, CE loss recovered, accuracy) are recomputed exactly as the
point estimate is, so an interval means "what this evaluation would report on another draw of
sequences of the same size".

    counts = resample_counts(n_units, resamples=1000, seed=0)      # [B, n_units]
    sums = counts @ per_unit_sums                                    # [B, m]
    lo, hi = percentile_ci(figure(sums))
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from saeforge.errors import UserError

log = logging.getLogger(__name__)

CI_SUFFIX = "_ci95"


@dataclass(frozen=True)
class BootstrapSpec:
    """How intervals are drawn: B resamples from `seed`; fewer than `min_units` units is an error
    when `strict` (the CLI) and gives no interval (a logged warning) otherwise (the trainer's eval)."""
    resamples: int = 1000
    seed: int = 0
    min_units: int = 20
    strict: bool = False

    @property
    def enabled(self) -> bool:
        return self.resamples > 0


def resample_counts(n_units: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n_units] float64: how often each unit is drawn in each resample (each row sums to n_units)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_units, size=(resamples, n_units)) + np.arange(resamples)[:, None] * n_units
    return np.bincount(draws.ravel(), minlength=resamples * n_units).reshape(resamples, n_units).astype(np.float64)


def percentile_ci(values: np.ndarray) -> list[float] | None:
    """[2.5th, 97.5th] percentile of finite replicate values (None when none is finite)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def enough_units(n_units: int, spec: BootstrapSpec, what: str, fix: str) -> bool:
    """Whether `n_units` can carry intervals; raises UserError (strict) or warns (not strict) when too few."""
    if not spec.enabled:
        return False
    if n_units >= spec.min_units:
        return True
    msg = (f"{what} has only {n_units} independent units for the bootstrap intervals (needs >= {spec.min_units}); "
           f"{fix}, or pass --bootstrap 0 for no intervals")
    if spec.strict:
        raise UserError(msg)
    log.warning("no intervals: %s", msg)
    return False


def add_intervals(out: dict[str, Any], units: np.ndarray, figures: Callable[[np.ndarray], dict[str, np.ndarray]],
                  spec: BootstrapSpec, chunk: int = 250) -> None:
    """Put `<name>_ci95` beside every figure that `figures(resampled sums [B, m])` returns.

    `units` is [n_units, m] (per-unit sums); resamples are processed `chunk` at a time so the
    resampled sums stay small for wide units (e.g. per-latent fire counts)."""
    counts = resample_counts(len(units), spec.resamples, spec.seed)
    reps: dict[str, list[np.ndarray]] = {}
    u = torch.from_numpy(np.ascontiguousarray(units, dtype=np.float64))
    for s in range(0, len(counts), chunk):
        sums = (torch.from_numpy(counts[s:s + chunk]) @ u).numpy()
        for name, vals in figures(sums).items():
            reps.setdefault(name, []).append(np.asarray(vals, dtype=np.float64))
    for name, parts in reps.items():
        out[name + CI_SUFFIX] = percentile_ci(np.concatenate(parts))


def group_sums(groups: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique groups, per-group column sums) of row values [n, m] grouped by `groups` [n]."""
    uniq, inv = np.unique(groups, return_inverse=True)
    out = np.zeros((len(uniq), values.shape[1]), dtype=np.float64)
    np.add.at(out, inv, values)
    return uniq, out


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) across seed replicas."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


class UnitSums:
    """Per-sequence sums of per-row quantities, streamed in store order with bounded memory.

    `add(seq_ids, name=values[n, ...], …)`: rows of one sequence are contiguous, so a new unit
    starts where the sequence id changes. Once more than 2·max_units units would exist, neighbours
    merge pairwise (a unit becomes a block of 2, 4, … consecutive sequences): still a valid cluster
    bootstrap, slightly conservative. Integer values (fire counts) are summed as int32, others in
    float64."""

    def __init__(self, max_units: int = 1024):
        self.max_units = max(1, int(max_units))
        self.block = 1  # sequences per unit
        self.n_seq = 0
        self.last_seq: int | None = None
        self.data: dict[str, torch.Tensor] = {}

    @property
    def n_units(self) -> int:
        return 0 if self.n_seq == 0 else (self.n_seq - 1) // self.block + 1

    def _merge(self) -> None:
        for k, t in self.data.items():
            half = t.shape[0] // 2
            t[:half] = t[0::2] + t[1::2]
            t[half:] = 0
        self.block *= 2

    def add(self, seq: np.ndarray, **values: torch.Tensor) -> None:
        if len(seq) == 0:
            return
        seq = np.asarray(seq)
        starts = np.empty(len(seq), dtype=bool)
        starts[0] = self.last_seq is None or seq[0] != self.last_seq
        starts[1:] = seq[1:] != seq[:-1]
        ordinal = self.n_seq - 1 + np.cumsum(starts)  # which sequence (0-based, in arrival order) each row is in
        self.n_seq += int(starts.sum())
        self.last_seq = int(seq[-1])
        while self.n_units > 2 * self.max_units:
            self._merge()
        unit = ordinal // self.block  # non-decreasing: rows of one unit are contiguous
        cuts = np.flatnonzero(np.diff(unit)) + 1
        seg = np.concatenate([[0], cuts])
        uid = torch.from_numpy(unit[seg])
        for name, v in values.items():
            t = self.data.get(name)
            if t is None:
                dt = torch.int32 if not v.dtype.is_floating_point else torch.float64
                t = self.data[name] = torch.zeros((2 * self.max_units, *v.shape[1:]), dtype=dt)
            sums = np.add.reduceat(v.to(t.dtype).numpy(), seg, axis=0)  # segment sums (fast, unlike index_add_)
            t[uid] += torch.from_numpy(sums)

    def units(self, name: str) -> np.ndarray:
        """[n_units, ...] sums of `name`."""
        return self.data[name][: self.n_units].numpy()
