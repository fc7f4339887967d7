"""`saeforge features SAE_DIR --store STORE.zarr --out DIR [--top 20] [--split heldout|all]`

One streaming pass over the store (no model rerun: the store holds tokens, seq and pos), the
SAE's logit attribution through the model's final norm and unembedding, a label per latent;
writes DIR/features.json, the compact data under DIR/data/ and the static viewer (DIR/index.html).
A transcoder is read at its input hook point; a crosscoder at all its hook points side by side (its
shared code), and its logits come from its last layer's decoder.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from saeforge.config import config_dict, option, parse_config, save_config
from saeforge.errors import UserError
from collect.model import load_model
from collect.store import Split, Store

log = logging.getLogger(__name__)


@dataclass
class FeaturesConfig:
    sae: str = option("", "SAE directory written by `saeforge train`", positional=True)
    store: str = option("", "activation store the statistics are read from")
    out: str = option("runs/features", "output directory")
    top: int = option(20, "top activating examples per latent")
    split: Split = option("all", "rows to read (keep rows only)")
    window: int = option(10, "context tokens either side of an example")
    samples: int = option(16, "reservoir sample per latent for the quantile examples")
    quantiles: int = option(4, "activation quantile groups shown per latent")
    per_quantile: int = option(3, "sampled examples shown per quantile group")
    logits: int = option(10, "top positive/negative output tokens per latent")
    model: str | None = option(None, "model spec for tokenizer and unembedding (default: the store's)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    block_rows: int = option(8192, "rows per block of the pass")
    measure: bool = option(False, "also time an encode-only pass and print both rates")
    shard_size: int = option(64, "latents per data shard (one small .js file each)")
    dashboard: bool = option(True, "write the static viewer (index.html) beside the data")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if not self.sae:
            raise UserError("give the SAE directory: saeforge features SAE_DIR --store STORE.zarr --out DIR")
        if not self.store:
            raise UserError("--store is required: the activation store to read (e.g. runs/quickstart/store.zarr)")
        if self.top < 1:
            raise UserError(f"--top {self.top} must be at least 1")
        if self.window < 0 or self.samples < 1 or self.quantiles < 1 or self.per_quantile < 1:
            raise UserError("--window must be ≥ 0; --samples, --quantiles and --per-quantile ≥ 1")
        if self.shard_size < 1:
            raise UserError(f"--shard-size {self.shard_size} must be at least 1")


def check_out_dir(out: str) -> Path:
    """Make sure `out` is (or can become) a writable directory, before any work is done."""
    from saeforge.urls import is_local, local_path
    if not is_local(out):
        raise UserError(f"--out {out!r}: the viewer is a folder of static files; pass a local directory")
    p = Path(local_path(out))
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {out!r} is a file, not a directory; pass a directory path (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out!r} is not writable ({e.strerror or e}); pass a directory you can write to") from None
    return p


def absolute(path: str) -> str:
    """Local paths made absolute (so `serve` and `explain` find them from any directory); URLs as given."""
    from saeforge.urls import is_local, local_path
    return os.path.abspath(local_path(path)) if is_local(path) else str(path)


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.dashboard import install_viewer
    from analysis.features import encode_rate, feature_stats
    from analysis.features_io import write_features
    from analysis.labels import logit_table, unembedding, vocab_strings
    from sae.io import check_store_points, load_sae, read_cfg, sae_summary

    cfg, _ = parse_config(FeaturesConfig, argv, section="features", prog="saeforge features",
                          description="Per-latent statistics, top examples, logits and labels; the static viewer.")
    out = check_out_dir(cfg.out)
    store = Store.open(cfg.store)
    meta = sae_summary(cfg.sae)
    ins, outs = check_store_points(read_cfg(cfg.sae), store, cfg.sae)
    hook: str | list[str] = ins[0] if len(ins) == 1 else ins  # a crosscoder reads its hook points side by side
    sae = load_sae(cfg.sae, cfg.device)
    lm = load_model(cfg.model or store.model_spec, cfg.device)
    if cfg.model is None and lm.weights_hash != store.model_hash:
        raise UserError(f"model {store.model_spec!r} loaded now has weights hash {lm.weights_hash[:12]} but store "
                        f"{cfg.store!r} was written with {store.model_hash[:12]}; pass --model with the store's model")
    stats = feature_stats(sae, store, hook, split=cfg.split, top=cfg.top, samples=cfg.samples, window=cfg.window,
                          block_rows=cfg.block_rows, quiet=cfg.quiet)
    if stats.n_rows == 0:
        raise UserError(f"store {cfg.store!r} has no rows in split {cfg.split!r}; use --split all")
    rate = stats.n_rows / max(stats.seconds, 1e-9)
    rates = {"stats_rows_per_s": rate, "stats_seconds": stats.seconds, "encode_seconds_in_pass": stats.encode_seconds}
    if cfg.measure:
        n, s = encode_rate(sae, store, hook, cfg.split)
        rates |= {"encode_only_rows_per_s": n / max(s, 1e-9), "encode_only_seconds": s}
    t0 = time.perf_counter()
    logits = logit_table(sae.decoder_rows(-1).detach(), lm.model, top=cfg.logits)  # a crosscoder: its last layer
    vocab = vocab_strings(lm.tokenizer, unembedding(lm.model).shape[0])
    meta_out = {"sae": {"path": absolute(cfg.sae), **meta, "hook_point": hook if isinstance(hook, str) else None,
                        "logits_from": outs[-1]},
                "store": {"path": absolute(cfg.store), "n_tokens": store.n_tokens, "split": cfg.split,
                          "rows_counted": stats.n_rows, "corpus": store.attrs.get("corpus")},
                "model": store.model_spec, "model_hash": store.model_hash, "prepend_bos": store.attrs.get("prepend_bos"),
                "top": cfg.top, "window": cfg.window, "rates": rates, "config": config_dict(cfg)}
    write_features(out, stats, vocab, logits, meta_out, n_quantiles=cfg.quantiles, per_quantile=cfg.per_quantile,
                   shard_size=cfg.shard_size, quiet=cfg.quiet)
    save_config(cfg, str(out))
    if cfg.dashboard:
        install_viewer(out)
    alive = int((stats.count > 0).sum())
    print(f"{stats.d_sae} latents ({alive} fired) over {stats.n_rows} rows of {cfg.store} [{cfg.split}]"
          + ("" if isinstance(hook, str) else f" at {', '.join(hook)} (logits from {hook[-1]}'s decoder)"))
    print(f"stats pass: {rate:,.0f} rows/s ({stats.seconds:.1f} s, encoding {stats.encode_seconds:.1f} s of it)")
    if cfg.measure:
        print(f"encode only: {rates['encode_only_rows_per_s']:,.0f} rows/s "
              f"(stats pass runs at {rate / rates['encode_only_rows_per_s']:.0%} of the encode bound)")
    size = sum(f.stat().st_size for f in (out / "data").rglob("*") if f.is_file())
    print(f"labels, logits and files: {time.perf_counter() - t0:.1f} s; data {size / 1e6:.1f} MB "
          f"({size / stats.d_sae / 1024:.2f} KiB per latent)")
    print(f"wrote {out / 'features.json'}" + (f"; open {out / 'index.html'} (or: saeforge serve {out})"
                                               if cfg.dashboard else ""))
    return 0
