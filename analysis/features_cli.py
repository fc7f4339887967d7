"""`saeforge features SAE_DIR --store STORE.zarr --out DIR [--top 20] [--split heldout|all]`

One streaming pass over the store (no model rerun: the store holds tokens, seq and pos), the
SAE's logit attribution through the model's final norm and unembedding, a label per latent;
writes DIR/features.json, DIR/latents/NNNNN.json and the HTML dashboard (DIR/index.html).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from saeforge.config import config_dict, parse_config, save_config
from saeforge.errors import UserError
from collect.model import load_model
from collect.store import Store

log = logging.getLogger(__name__)


@dataclass
class FeaturesConfig:
    sae: str | None = field(default=None, metadata={"help": "SAE directory (or give it as the first argument)"})
    store: str | None = field(default=None, metadata={"help": "activation store the statistics are read from"})
    out: str = field(default="runs/features", metadata={"help": "output directory"})
    top: int = field(default=20, metadata={"help": "top activating examples per latent"})
    split: str = field(default="all", metadata={"help": "rows to read: all, heldout or train (keep rows only)"})
    window: int = field(default=10, metadata={"help": "context tokens either side of an example"})
    samples: int = field(default=16, metadata={"help": "reservoir sample per latent for the quantile examples"})
    quantiles: int = field(default=4, metadata={"help": "activation quantile groups shown per latent"})
    logits: int = field(default=10, metadata={"help": "top positive/negative output tokens per latent"})
    model: str | None = field(default=None, metadata={"help": "model spec for tokenizer and unembedding (default: the store's)"})
    device: str = "cpu"
    block_rows: int = field(default=8192, metadata={"help": "rows per block of the pass"})
    measure: bool = field(default=False, metadata={"help": "also time an encode-only pass and print both rates"})
    dashboard: bool = field(default=True, metadata={"help": "render the HTML dashboard"})
    quiet: bool = False

    def validate(self) -> None:
        if not self.sae:
            raise UserError("give the SAE directory: saeforge features SAE_DIR --store STORE.zarr --out DIR")
        if not self.store:
            raise UserError("--store is required: the activation store to read (e.g. runs/quickstart/store.zarr)")
        if self.top < 1:
            raise UserError(f"--top {self.top} must be at least 1")
        if self.split not in ("heldout", "train", "all"):
            raise UserError(f"--split {self.split!r}: use heldout, train or all")
        if self.window < 0 or self.samples < 1 or self.quantiles < 1:
            raise UserError("--window must be ≥ 0, --samples and --quantiles ≥ 1")


def split_positionals(argv: Sequence[str] | None, names: Sequence[str]) -> list[str]:
    """Leading positional arguments → `--name value` flags (a leading *.toml stays the config)."""
    import sys
    args = list(sys.argv[1:] if argv is None else argv)
    out, lead = [], []
    while args and not args[0].startswith("-"):
        lead.append(args.pop(0))
    config = [a for a in lead if a.endswith(".toml")]
    rest = [a for a in lead if not a.endswith(".toml")]
    if len(rest) > len(names):
        raise UserError(f"unexpected argument(s) {rest[len(names):]}")
    for name, value in zip(names, rest):
        out += [f"--{name}", value]
    return config + out + args


def sae_meta(sae_dir: str) -> dict:
    """hook point, model and hash of an SAE directory (cfg.json written by `saeforge train`)."""
    from sae.io import read_cfg
    cfg = read_cfg(sae_dir)
    hook = cfg.get("hook_point") or cfg.get("hook") or (cfg.get("config") or {}).get("hook")
    return {"hook_point": hook, "model": cfg.get("model"), "model_hash": cfg.get("model_hash"),
            "architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
            "k": cfg.get("k")}


def check_match(meta: dict, store: Store, sae_dir: str) -> str:
    """The hook to read; UserError when the SAE was trained on another hook, model or width."""
    hook = meta["hook_point"]
    if hook is None:
        if len(store.hooks) != 1:
            raise UserError(f"SAE {sae_dir!r} names no hook point and store {store.path!r} holds {store.hooks}")
        hook = store.hooks[0]
    if hook not in store.hooks:
        raise UserError(f"SAE {sae_dir!r} was trained on hook {hook!r} but store {store.path!r} holds {store.hooks}; "
                        f"pass a store collected at {hook!r}")
    if meta.get("model_hash") and meta["model_hash"] != store.model_hash:
        raise UserError(f"SAE {sae_dir!r} was trained on model {meta.get('model')!r} (hash {meta['model_hash'][:12]}) "
                        f"but store {store.path!r} comes from {store.model_spec!r} (hash {store.model_hash[:12]}); "
                        f"use a store collected from the SAE's model")
    if meta.get("d_in") and int(meta["d_in"]) != store.d_model:
        raise UserError(f"SAE {sae_dir!r} has d_in {meta['d_in']} but store {store.path!r} has d_model {store.d_model}")
    return hook


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.dashboard import render_dashboard
    from analysis.features import build_records, encode_rate, feature_stats, write_features
    from analysis.labels import logit_table, vocab_strings
    from sae.io import load_sae

    cfg, _ = parse_config(FeaturesConfig, split_positionals(argv, ["sae"]), section="features", prog="saeforge features",
                          description="Per-latent statistics, top examples, logits and labels; HTML dashboard.")
    store = Store.open(cfg.store)  # type: ignore[arg-type]
    meta = sae_meta(cfg.sae)  # type: ignore[arg-type]
    hook = check_match(meta, store, cfg.sae)  # type: ignore[arg-type]
    sae = load_sae(cfg.sae, cfg.device)  # type: ignore[arg-type]
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
