"""`saeforge features SAE_DIR --store STORE.zarr --out DIR [--top 20] [--split heldout|all]`

One streaming pass over the store (no model rerun: the store holds tokens, seq and pos), the
SAE's logit attribution through the model's final norm and unembedding, a label per latent;
writes DIR/features.json, DIR/latents/NNNNN.json and the HTML dashboard (DIR/index.html).
"""
from __future__ import annotations

import logging
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
    logits: int = option(10, "top positive/negative output tokens per latent")
    model: str | None = option(None, "model spec for tokenizer and unembedding (default: the store's)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    block_rows: int = option(8192, "rows per block of the pass")
    measure: bool = option(False, "also time an encode-only pass and print both rates")
    dashboard: bool = option(True, "render the HTML dashboard")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if not self.sae:
            raise UserError("give the SAE directory: saeforge features SAE_DIR --store STORE.zarr --out DIR")
        if not self.store:
            raise UserError("--store is required: the activation store to read (e.g. runs/quickstart/store.zarr)")
        if self.top < 1:
            raise UserError(f"--top {self.top} must be at least 1")
        if self.window < 0 or self.samples < 1 or self.quantiles < 1:
            raise UserError("--window must be ≥ 0, --samples and --quantiles ≥ 1")


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.dashboard import render_dashboard
    from analysis.features import build_records, encode_rate, feature_stats, write_features
    from analysis.labels import logit_table, vocab_strings
    from sae.io import check_store_match, load_sae, read_cfg, sae_summary

    cfg, _ = parse_config(FeaturesConfig, argv, section="features", prog="saeforge features",
                          description="Per-latent statistics, top examples, logits and labels; HTML dashboard.")
    store = Store.open(cfg.store)
    meta = sae_summary(cfg.sae)
    hook = check_store_match(read_cfg(cfg.sae), store, cfg.sae)
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
    logits = logit_table(sae.W_dec.detach(), lm.model, top=cfg.logits)
    vocab = vocab_strings(lm.tokenizer, int(lm.model.get_output_embeddings().weight.shape[0]))
    index, records = build_records(stats, vocab, logits, n_quantiles=cfg.quantiles, n_logits=cfg.logits)
    out = Path(cfg.out)
    meta_out = {"sae": {"path": str(cfg.sae), **meta, "hook_point": hook},
                "store": {"path": str(cfg.store), "n_tokens": store.n_tokens, "split": cfg.split,
                          "rows_counted": stats.n_rows, "corpus": store.attrs.get("corpus")},
                "model": store.model_spec, "top": cfg.top, "window": cfg.window, "rates": rates,
                "config": config_dict(cfg)}
    write_features(out, meta_out, index, records)
    save_config(cfg, out)
    if cfg.dashboard:
        render_dashboard(out, quiet=cfg.quiet)
    alive = sum(1 for e in index if e["count"] > 0)
    print(f"{len(index)} latents ({alive} fired) over {stats.n_rows} rows of {cfg.store} [{cfg.split}]")
    print(f"stats pass: {rate:,.0f} rows/s ({stats.seconds:.1f} s, encoding {stats.encode_seconds:.1f} s of it)")
    if cfg.measure:
        print(f"encode only: {rates['encode_only_rows_per_s']:,.0f} rows/s "
              f"(stats pass runs at {rate / rates['encode_only_rows_per_s']:.0%} of the encode bound)")
    print(f"labels, logits and files: {time.perf_counter() - t0:.1f} s")
    print(f"wrote {out / 'features.json'}" + (f" and {out / 'index.html'}" if cfg.dashboard else ""))
    return 0
