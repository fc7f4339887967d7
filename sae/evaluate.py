"""Full evaluation of an SAE: reconstruction and sparsity on a store's held-out rows, plus (with a
model) downstream CE loss / KL with the SAE spliced in (`sae.splice`).

Every figure is a ratio of sums streamed over the evaluated rows in float64, so it is exact for any
number of rows and does not depend on the batch size:

    FVU            Σ‖x − x̂‖² / Σ‖x − x̄‖²   (x̄ = mean of the evaluated rows; pooled, not per batch)
    explained var. 1 − FVU
    mse            Σ‖x − x̂‖² / (n·d)         (per element, as SAELens/SAEBench)
    sq_err_per_token Σ‖x − x̂‖² / n           (summed over dimensions, as dictionary_learning)
    cossim         mean over rows of x·x̂ / (‖x‖‖x̂‖)
    l2_ratio       mean over rows of ‖x̂‖ / ‖x‖
    l0             mean over rows of #{i : f_i(x) > 0}
    density_i      #{rows where f_i > 0} / n;  dead: density 0;  dense: density > 0.1

    from sae.evaluate import evaluate_sae, evaluate_rows
    m = evaluate_sae(sae, store, "layers.6.resid_post", tokens=100_000, ce_tokens=8192)   # loads the model
    m = evaluate_sae(sae, store, hook, tokens=8192)                # cheap part only, no model
    m = evaluate_rows(sae, x_heldout, input_scale=scale)           # rows already in memory
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, cast

import numpy as np
import torch

from saeforge.errors import UserError
from saeforge.progress import progress
from collect.store import Split, Store
from sae.architectures import SAE
from sae.bootstrap import BootstrapSpec, UnitSums, enough_units
from sae.loader import check_hooks, hook_list, read_rows

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens is "dense"
HIST_EDGES = [x / 2 for x in range(-16, 1)]  # log10 density bins: -8, -7.5, …, 0 (values below -8 clip into the first)
SPLITS = ("heldout", "train", "all")


class _Moments:
    """Streaming n, mean and Σ‖x − mean‖² (Chan et al.'s pairwise merge, float64)."""

    def __init__(self, d: int):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = 0.0

    def add(self, x: torch.Tensor) -> None:
        nb = x.shape[0]
        if nb == 0:
            return
        xd = x.double().cpu()
        mb = xd.mean(0)
        m2b = float((xd - mb).pow(2).sum())
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + float(delta.pow(2).sum()) * self.n * nb / n
        self.mean += delta * (nb / n)
        self.n = n


@dataclass
class _RowSet:
    """Reconstruction sums for one set of rows (keep rows, keep + outliers, all rows)."""
    d: int
    moments: _Moments = None  # type: ignore[assignment]
    sq_err: float = 0.0
    cos: float = 0.0
    l2_ratio: float = 0.0
    nonfinite: int = 0

    def __post_init__(self) -> None:
        self.moments = _Moments(self.d)

    def add(self, x: torch.Tensor, err: torch.Tensor, cos: torch.Tensor, l2r: torch.Tensor) -> None:
        """Rows x with their per-row ‖x − x̂‖², cosine and norm ratio (float64)."""
        if x.shape[0] == 0:
            return
        self.moments.add(x)
        self.sq_err += float(err.sum())
        self.cos += float(cos.sum())
        self.l2_ratio += float(l2r.sum())

    def result(self, prefix: str = "") -> dict[str, float]:
        n = self.moments.n
        if n == 0:
            return {f"{prefix}fvu": math.nan, f"{prefix}n_rows": 0}
        fvu = self.sq_err / max(self.moments.m2, 1e-300)
        return {f"{prefix}fvu": fvu, f"{prefix}explained_variance": 1.0 - fvu,
                f"{prefix}mse": self.sq_err / (n * self.d), f"{prefix}sq_err_per_token": self.sq_err / n,
                f"{prefix}cossim": self.cos / n, f"{prefix}l2_ratio": self.l2_ratio / n, f"{prefix}n_rows": n}


def _row_errors(yd: torch.Tensor, hd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (float64): ‖y − ŷ‖², cosine(y, ŷ) and ‖ŷ‖ / ‖y‖."""
    err = (yd - hd).pow(2).sum(1)
    ny, nh = yd.norm(dim=1), hd.norm(dim=1)
    return err, (yd * hd).sum(1) / (ny * nh).clamp_min(1e-30), nh / ny.clamp_min(1e-30)


def _scale_vector(scale: float | Sequence[float], d: int) -> float | torch.Tensor:
    """A scale per hook point (side by side, d columns each) as a column vector; a float stays a float."""
    if isinstance(scale, (int, float)):
        return float(scale)
    vals = [float(v) for v in scale]
    return vals[0] if len(vals) == 1 else torch.tensor(vals).repeat_interleave(d)


@dataclass
class ReconstructionAccumulator:
    """Feed batches of raw rows (with masks saying which set each row is in); read exact metrics.

    Primary metrics (fvu, mse, cossim, l2_ratio, l0, densities) are over the rows with `main` true.
    `with_outliers_*` is over main ∪ outlier rows and `all_rows_*` over every row fed. With
    `units` (a `sae.bootstrap.UnitSums`) and the rows' sequence ids, the same sums are also kept
    per sequence for the bootstrap intervals (`sae.eval_intervals`).

    A transcoder is scored against its target rows (`add(x, …, target=y)`); a crosscoder's rows are its
    layers side by side, and its `fvu` is the mean of `layer_fvu` (one per layer, as it trains); a
    Matryoshka SAE also gets `prefix_fvu`, the FVU of each nested prefix (`prefix_sizes` latents).
    Scales (the trainer's units) may be one per hook point: `input_scale` for the inputs,
    `output_scale` (default: input_scale) for what is reconstructed."""
    sae: SAE
    input_scale: float | Sequence[float] = 1.0
    output_scale: float | Sequence[float] | None = None
    fire_counts: torch.Tensor = None  # type: ignore[assignment]
    active_sum: float = 0.0
    sets: dict[str, _RowSet] = field(default_factory=dict)
    units: UnitSums | None = None
    layers: list[_RowSet] = field(default_factory=list)
    prefix_sq_err: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = self.sae.cfg
        d = c.width
        self.fire_counts = torch.zeros(c.d_sae, dtype=torch.int64)
        self.sets = {"": _RowSet(d), "with_outliers_": _RowSet(d), "all_rows_": _RowSet(d)}
        self.layers = [_RowSet(c.d_in) for _ in range(c.n_layers)] if c.n_layers > 1 else []
        self.prefix_sq_err = [0.0] * len(c.group_sizes or []) if c.arch == "matryoshka" else []

    def _scales(self, dev: torch.device) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        d = self.sae.cfg.d_in
        s_in = _scale_vector(self.input_scale, d)
        s_out = s_in if self.output_scale is None else _scale_vector(self.output_scale, d)
        return tuple(s.to(dev) if isinstance(s, torch.Tensor) else s for s in (s_in, s_out))  # type: ignore[return-value]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents in the SAE's units, output in raw units) for raw rows x, inference rule."""
        s_in, s_out = self._scales(x.device)
        f, out = self.sae.encode_decode(x * s_in)
        return f, out / s_out

    @torch.no_grad()
    def add(self, x: torch.Tensor, main: torch.Tensor | None = None, outlier: torch.Tensor | None = None,
            seq: np.ndarray | None = None, target: torch.Tensor | None = None) -> None:
        dev = next(self.sae.parameters()).device
        x = x.to(dev, torch.float32)
        main = torch.ones(len(x), dtype=torch.bool) if main is None else main.cpu()
        outlier = torch.zeros(len(x), dtype=torch.bool) if outlier is None else outlier.cpu()
        f, x_hat = self.reconstruct(x)
        y = x if target is None else target.to(dev, torch.float32)
        if self.prefix_sq_err:
            self._add_prefixes(f, x, y, main.to(dev))
        y, x_hat = y.cpu(), x_hat.float().cpu()
        active = (f > 0).cpu()
        self.fire_counts += active[main].sum(0)
        self.active_sum += float(active[main].sum())
        yd, hd = y.double(), x_hat.double()
        err, cos, l2r = _row_errors(yd, hd)
        wo = main | outlier
        for prefix, m in (("", main), ("with_outliers_", wo), ("all_rows_", torch.ones_like(main))):
            self.sets[prefix].add(y[m], err[m], cos[m], l2r[m])
        for i, rs in enumerate(self.layers):
            cols = self.sae.layer_slice(i)
            rs.add(y[main][:, cols], *_row_errors(yd[main][:, cols], hd[main][:, cols]))
        if self.units is not None and seq is not None:
            vals: dict[str, torch.Tensor] = {}
            for prefix, m in (("", main), ("with_outliers_", wo), ("all_rows_", torch.ones_like(main))):
                w = m.double()
                vals.update({prefix + "n": w, prefix + "sq": err * w, prefix + "s2": yd.pow(2).sum(1) * w,
                             prefix + "s1": yd * w[:, None]})
            w = main.double()
            vals.update(cos=cos * w, l2r=l2r * w, active=active.sum(1).double() * w,
                        fires=(active & main[:, None]).to(torch.int32))
            self.units.add(seq, **vals)

    def _add_prefixes(self, f: torch.Tensor, x: torch.Tensor, y: torch.Tensor, main: torch.Tensor) -> None:
        """Squared error of each nested prefix's reconstruction (raw units) on the main rows."""
        s_in, s_out = self._scales(x.device)
        skip = self.sae.skip_term(x[main] * s_in)
        for g, rec in enumerate(self.sae.prefix_decodes(f[main])):  # type: ignore[operator]
            rec = rec if skip is None else rec + skip
            self.prefix_sq_err[g] += float(((rec / s_out).double() - y[main].double()).pow(2).sum())

    @property
    def n_rows(self) -> int:
        return self.sets[""].moments.n

    def result(self) -> dict[str, Any]:
        n = self.n_rows
        out: dict[str, Any] = {}
        for prefix, rs in self.sets.items():
            r = rs.result(prefix)
            if prefix:  # secondary row sets: the headline reconstruction figures only
                r = {k: v for k, v in r.items() if k.endswith(("fvu", "explained_variance", "mse", "n_rows"))}
            out.update(r)
        if self.layers:  # a crosscoder trains on the mean of its layers' FVUs; the pooled figure stays too
            out["layer_fvu"] = [rs.result()["fvu"] for rs in self.layers]
            out["pooled_fvu"] = out["fvu"]
            out["fvu"] = float(np.mean(out["layer_fvu"])) if n else math.nan
            out["explained_variance"] = 1.0 - out["fvu"]
        if self.prefix_sq_err:
            m2 = self.sets[""].moments.m2
            out["prefix_sizes"] = list(itertools.accumulate(self.sae.cfg.group_sizes or []))
            out["prefix_fvu"] = [e / max(m2, 1e-300) if n else math.nan for e in self.prefix_sq_err]
        density = self.fire_counts.double() / max(n, 1)
        out["l0"] = self.active_sum / max(n, 1)
        out["dead_fraction"] = float((self.fire_counts == 0).double().mean())
        out["dense_fraction"] = float((density > DENSE_THRESHOLD).double().mean())
        out["latent_density_hist"] = density_histogram(density.numpy())
        out["d_sae"] = int(self.sae.cfg.d_sae)
        return out


def density_histogram(density: np.ndarray) -> dict[str, Any]:
    """Counts of log10(density) in HIST_EDGES bins; dead latents (density 0) are counted apart."""
    live = density[density > 0]
    vals = np.clip(np.log10(live), HIST_EDGES[0], HIST_EDGES[-1])
    counts, _ = np.histogram(vals, bins=HIST_EDGES)
    return {"log10_edges": list(HIST_EDGES), "counts": counts.tolist(), "dead": int((density == 0).sum())}


def _batch_rows(d_sae: int) -> int:
    """Rows per batch so dense latents stay near 256 MB."""
    return int(max(64, min(4096, (1 << 26) // max(d_sae, 1))))


@torch.no_grad()
def evaluate_rows(sae: SAE, x: torch.Tensor, input_scale: float | Sequence[float] = 1.0,
                  batch_rows: int | None = None, target: torch.Tensor | None = None,
                  output_scale: float | Sequence[float] | None = None) -> dict[str, Any]:
    """Cheap metrics on rows already in memory (all treated as evaluated rows): for the trainer's
    periodic evaluation. `input_scale`: the SAE takes x·input_scale (x̂ is divided back by
    `output_scale`, default the same); `target`: a transcoder's target rows."""
    was = sae.training
    sae.eval()
    try:
        acc = ReconstructionAccumulator(sae, input_scale, output_scale)
        b = batch_rows or _batch_rows(sae.cfg.d_sae)
        for s in range(0, len(x), b):
            acc.add(x[s:s + b], target=None if target is None else target[s:s + b])
        r = acc.result()
    finally:
        sae.train(was)
    return {k: v for k, v in r.items() if not k.startswith(("with_outliers_", "all_rows_"))}


def outlier_threshold(store: Store, hook: str) -> float | None:
    """The collector's norm-outlier threshold at `hook` (outlier_norm × median norm), if recorded."""
    med = (store.attrs.get("norm_median") or {}).get(hook)
    k = (store.attrs.get("config") or {}).get("outlier_norm")
    return None if med is None or k is None else float(k) * float(med)


def _split_rows(store: Store, split: str, a: int, b: int) -> np.ndarray:
    """Rows of [a, b) in the split, keep or not."""
    if split == "all":
        return np.ones(b - a, dtype=bool)
    held = store.heldout(a, b).astype(bool)
    return held if split == "heldout" else ~held


def check_split(store: Store, split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"--split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    if split == "heldout" and not store.heldout().any():
        raise UserError(f"store {store.path!r} has no held-out rows (collected with --heldout-fraction "
                        f"{store.attrs.get('heldout_fraction', 0)}); re-collect with --heldout-fraction 0.05, "
                        f"or pass --split all to evaluate on rows the SAE was trained on")
    if not store.split_mask(cast(Split, split)).any():
        raise UserError(f"store {store.path!r} has no keep rows in split {split!r}; use --split all")


@torch.no_grad()
def unit_cap(d_sae: int) -> int:
    """Bootstrap units kept per evaluation (≤ 2× this): per-latent fire counts stay near 128 MB."""
    return int(max(64, min(1024, (1 << 24) // max(d_sae, 1))))


def reconstruction_metrics(sae: SAE, store: Store, hook: str | Sequence[str], tokens: int | None = None,
                           split: str = "heldout", input_scale: float = 1.0, batch_rows: int | None = None,
                           quiet: bool = True, ci: BootstrapSpec | None = None,
                           target: str | None = None) -> dict[str, Any]:
    """Reconstruction and sparsity over the first `tokens` keep rows of `split` in store order.

    The store is scanned in order until `tokens` keep rows of the split are seen (all of them when
    None); the `with_outliers_*` and `all_rows_*` figures cover the split's rows of that same span.
    With `ci`, every figure gets a `<name>_ci95` bootstrap interval over the span's sequences.
    `hook`: the point read (a crosscoder's list: its layers side by side); `target`: a transcoder's
    point, which its output is scored against. Norm outliers are those of the (single) input point."""
    check_split(store, split)
    hooks = hook_list(hook)
    thr = outlier_threshold(store, hooks[0]) if len(hooks) == 1 else None
    was = sae.training
    sae.eval()
    units = UnitSums(unit_cap(sae.cfg.d_sae)) if ci is not None and ci.enabled else None
    acc = ReconstructionAccumulator(sae, input_scale, units=units)
    limit = tokens if tokens is not None else store.n_tokens
    bar = progress(total=limit if tokens is not None else int(store.split_mask(cast(Split, split)).sum()),
                   desc="eval", unit="tok", quiet=quiet)
    b = batch_rows or _batch_rows(sae.cfg.d_sae)
    n_bos_outliers = 0
    try:
        for a, e in store.chunk_ranges():
            if acc.n_rows >= limit:
                break
            rows = _split_rows(store, split, a, e)
            if not rows.any():
                continue
            keep = store.keep(a, e).astype(bool)
            main = rows & keep
            # stop the span right after the `limit`-th keep row
            need = limit - acc.n_rows
            cum = np.cumsum(main)
            if cum[-1] > need:
                cut = int(np.searchsorted(cum, need)) + 1
                rows, main, keep, e = rows[:cut], main[:cut], keep[:cut], a + cut
            idx = np.flatnonzero(rows)
            x = torch.from_numpy(read_rows(store, hooks, a, e)[idx])
            y = None if target is None else torch.from_numpy(store.activations(target, a, e)[idx])
            m = torch.from_numpy(main[idx])
            if thr is not None:
                outl = (~m) & (x.norm(dim=1) > thr)
                n_bos_outliers += int((outl & torch.from_numpy(store.pos(a, e)[idx] == 0)).sum())
            else:
                outl = torch.zeros_like(m)
            if not torch.isfinite(x[m]).all() or (y is not None and not torch.isfinite(y[m]).all()):
                raise UserError(f"store {store.path!r} hook {','.join(hooks + ([target] if target else []))!r} "
                                f"has NaN/inf activations in rows [{a}, {e}); recollect it (e.g. with --dtype float32)")
            seq = store.seq(a, e)[idx] if units is not None else None
            for s in range(0, len(x), b):
                acc.add(x[s:s + b], m[s:s + b], outl[s:s + b], None if seq is None else seq[s:s + b],
                        target=None if y is None else y[s:s + b])
            bar.update(int(m.sum()))
    finally:
        bar.close()
        sae.train(was)
    r = acc.result()
    if thr is None:
        r["with_outliers_fvu"] = r["with_outliers_explained_variance"] = r["with_outliers_mse"] = None
        r["with_outliers_n_rows"] = None
    r["outlier_threshold"] = thr
    r["n_outlier_rows"] = None if thr is None else r["with_outliers_n_rows"] - r["n_rows"]
    r["n_outlier_rows_at_pos0"] = None if thr is None else n_bos_outliers  # BOS rows whose norm is massive too
    if units is not None and ci is not None:
        r["n_sequences"] = units.n_seq
        if enough_units(units.n_seq, ci, f"the evaluated span of store {store.path!r} ({split} split)",
                        "evaluate more rows (--tokens 0 takes all) or re-collect with a larger --heldout-fraction"):
            from sae.eval_intervals import add_reconstruction_intervals
            add_reconstruction_intervals(r, units, sae.cfg.width, ci)
            if sae.cfg.n_layers > 1:  # the intervals are of the pooled figures; a crosscoder's fvu is a mean of layers
                for k in ("fvu", "explained_variance"):
                    r[f"pooled_{k}_ci95"] = r.pop(f"{k}_ci95", None)
    return r


def evaluate_sae(sae: SAE, store: Store | str, hook: str | Sequence[str], *, tokens: int | None = 100_000,
                 ce_tokens: int = 0, model: Any = None, split: str = "heldout", input_scale: float = 1.0,
                 batch_rows: int | None = None, ce_batch_tokens: int = 512, quiet: bool = True,
                 ci: BootstrapSpec | None = None, target: str | None = None) -> dict[str, Any]:
    """All metrics of `sae` (raw-activation units unless `input_scale` ≠ 1) as one flat dict.

    hook: the point it reads (a crosscoder: its list of points); target: a transcoder's output point.
    tokens: keep rows of `split` for reconstruction/sparsity (None: all). ce_tokens: tokens of
    whole held-out sequences for the downstream CE/KL metrics (0: skip them; no model needed).
    model: a collect.model.LoadedModel; None loads the store's model when ce_tokens > 0.
    ci: bootstrap intervals (`<name>_ci95`) over held-out sequences; None: none."""
    st = Store.open(store) if isinstance(store, str) else store
    hooks = hook_list(hook)
    check_hooks(st, hooks + ([target] if target else []))
    if len(hooks) != sae.cfg.n_layers or sae.cfg.transcoder != bool(target):
        raise UserError(f"the {sae.cfg.kind} reads {sae.cfg.n_layers} hook point(s)"
                        f"{' and writes a target' if sae.cfg.transcoder else ''}; got {','.join(hooks)}"
                        f"{' → ' + target if target else ''}")
    if sae.cfg.d_in != st.d_model:
        raise UserError(f"the SAE takes d_in={sae.cfg.d_in} but store {st.path!r} has d_model={st.d_model}; "
                        f"pass the store it was trained on")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"hook_point": hooks[0] if len(hooks) == 1 else None, "hook_points": hooks,
                           "store": st.path, "split": split}
    if target:
        out["target_hook_point"] = target
    out.update(reconstruction_metrics(sae, st, hooks, tokens, split, input_scale, batch_rows, quiet, ci,
                                      target=target))
    out["recon_seconds"] = round(time.perf_counter() - t0, 3)
    if ce_tokens and ce_tokens > 0:
        from sae.splice import downstream_metrics
        t1 = time.perf_counter()
        if model is None:
            model = load_store_model(st, device=str(next(sae.parameters()).device))
        out.update(downstream_metrics(sae, st, hooks, model, ce_tokens, split=split, input_scale=input_scale,
                                      batch_tokens=ce_batch_tokens, quiet=quiet, ci=ci, target=target))
        out["ce_seconds"] = round(time.perf_counter() - t1, 3)
    return out


def load_store_model(store: Store, device: str = "cpu") -> Any:
    """Load the model that wrote `store` and check its weights hash."""
    from collect.model import load_model
    loaded = load_model(store.model_spec, device=device)
    if loaded.weights_hash != store.model_hash:
        raise UserError(f"model {store.model_spec!r} now has weights hash {loaded.weights_hash}, but store "
                        f"{store.path!r} was collected with {store.model_hash}; evaluate with the same model files")
    return loaded
