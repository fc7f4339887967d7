"""Held-out quality and speed of saeforge's trainer against sparsify at its real defaults, side by side.

    python bench/quality.py                       # collects its stores, budgets 200k, 400k, 1.2M tokens
    python bench/quality.py --store S.zarr --heldout-store T.zarr --budgets 400000 --trainers sparsify,saeforge
    python bench/quality.py --variant "sf-adam:optimizer=adam-schedulefree,lr=2e-3" --trainers sparsify,saeforge

Train rows: a store that `saeforge collect` writes from ../shared/data/wikitext-2/valid.txt
(SmolLM2-135M, layers.15.resid_post, BOS dropped by keep); held-out rows: another store from
test.txt, never trained on (only BOS dropped). Every trainer sees the same batches in the same order
(one ShuffledLoader stream, each batch handed to every trainer in turn, each step timed on its own, so
background load hits all alike):

  sparsify    sparsify's own code at its defaults (bench/peers.py), when `sparsify` is importable
  dense-adam  plain PyTorch TopK SAE with Adam at a constant lr
  saeforge    saeforge's Trainer.train_step at its defaults (plus any --variant: config overrides)
  cli         `saeforge train` end to end on the same store (its own loader, its own timing)

Printed per budget and trainer: held-out FVU over bulk rows (norm ≤ 5× the median norm; the
massive-activation tokens excluded) and over all rows, L0, dead latents (never active on the
held-out rows), training tokens/s, and the ratios against sparsify.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import DenseAdam, SparsifyDefaults, dense_adam_lr, sparsify_available  # noqa: E402
from collect.store import Store  # noqa: E402
from sae.config import TrainConfig  # noqa: E402
from sae.io import load_sae, save_sae  # noqa: E402
from sae.loader import ShuffledLoader  # noqa: E402
from sae.trainer import Trainer  # noqa: E402
from saeforge.config import build_config  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
HOOK = "layers.15.resid_post"


# ---- stores ------------------------------------------------------------------------------------
def collect(corpus: Path, out: Path, extra: list[str]) -> Store:
    """`saeforge collect` (as a subprocess, its own defaults but for `extra`) unless `out` is complete."""
    if out.exists():
        st = Store.open(str(out))
        if st.complete:
            return st
    cmd = [sys.executable, "-m", "collect", "collect", "--corpus", str(corpus), "--hooks", HOOK, "--out", str(out),
           "--quiet", *extra]
    print("$ saeforge " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return Store.open(str(out))


def eval_rows(store: Store, hook: str, n: int) -> np.ndarray:
    """The first n keep rows of a store (held-out store: every keep row is unseen text)."""
    out, have = [], 0
    for a, b in store.chunk_ranges():
        m = store.keep(a, b).astype(bool)
        out.append(store.activations(hook, a, b)[m])
        have += int(m.sum())
        if have >= n:
            break
    return np.concatenate(out)[:n]


# ---- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(enc: Callable[[torch.Tensor], torch.Tensor], W_dec: torch.Tensor, b_dec: torch.Tensor,
             x: torch.Tensor, bulk: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """FVU over bulk and all rows (each about its own mean), L0 over all rows, dead latent fraction.

    `enc` gives dense raw-unit latents; x̂ = f·W_dec + b_dec, decoded sparsely (topk SAEs)."""
    sq = torch.zeros(len(x), dtype=torch.float64)
    l0 = 0.0
    fired: torch.Tensor | None = None
    for s in range(0, len(x), chunk):
        xb = x[s:s + chunk]
        f = enc(xb)
        act = f > 0
        vals, idx = f.topk(int(act.sum(1).max()), dim=1, sorted=False)
        recon = torch.nn.functional.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
        sq[s:s + chunk] = (recon - xb).double().pow(2).sum(1)
        l0 += float(act.sum())
        fired = act.any(0) if fired is None else fired | act.any(0)
    assert fired is not None

    def fvu(m: torch.Tensor) -> float:
        xm = x[m].double()
        return float(sq[m].sum() / (xm - xm.mean(0)).pow(2).sum())

    return {"bulk_fvu": fvu(bulk), "all_fvu": fvu(torch.ones_like(bulk)), "l0": l0 / len(x),
            "dead": 1.0 - float(fired.float().mean())}


# ---- trainers ----------------------------------------------------------------------------------
class Saeforge:
    """saeforge's Trainer, stepped one batch at a time; evaluated on the weights it saves."""

    def __init__(self, name: str, store: Store, tokens: int, a: argparse.Namespace, tmp: Path,
                 overrides: dict[str, str]):
        self.name = name
        base = {"store": store.path, "hook": a.hook, "out": str(tmp / name), "k": str(a.k),
                "expansion": str(a.expansion), "tokens": str(tokens), "batch_size": str(a.batch_size),
                "wandb": "disabled", "quiet": "true", "eval_every": "0", "checkpoint_every": "0",
                "threads": str(a.threads)}
        overrides = dict(overrides)
        self.from_sparsify = overrides.pop("from_sparsify", "") not in ("", "0", "false")
        self.cfg = build_config(TrainConfig, {}, {**base, **overrides})
        self.tr = Trainer(self.cfg)
        self.tr._init_fresh()
        self.tmp = tmp

    def step(self, x: torch.Tensor) -> None:
        self.tr.train_step(x * self.tr.scale)

    @torch.no_grad()
    def start_from(self, sp: SparsifyDefaults, first: torch.Tensor) -> None:
        """Take sparsify's initial weights (variant key from_sparsify=1): its encoder, its unit-norm
        decoder, b_enc 0 and b_dec = the first batch's mean (what sparsify sets on its first step), in
        our input units: the two trainers then differ only in their steps."""
        sae, sc = self.tr.members[0].sae, sp.sc
        W = sc.W_dec.detach()
        sae.enc.copy_(sc.encoder.weight)
        sae.b_enc.zero_()
        sae.W_dec.copy_(W / (W.norm(dim=1, keepdim=True) + torch.finfo(W.dtype).eps))
        sae.b_dec.copy_(first.mean(0) * self.tr.scale)

    def encoder_decoder(self) -> tuple[Callable, torch.Tensor, torch.Tensor]:
        m = self.tr.members[0]
        with self.tr.inference(m) as sae:
            assert sae is not None  # one process: never a shard
            save_sae(sae, self.tmp / f"{self.name}_saved", scale=self.tr.scale)
        sae = load_sae(self.tmp / f"{self.name}_saved")
        return sae.encode, sae.W_dec.detach(), sae.b_dec.detach()


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """"name:key=value,key=value" (values as on the command line; lists with '+')."""
    name, _, rest = text.partition(":")
    kv = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        kv[k.strip().replace("-", "_")] = v.strip().replace("+", ",")
    return name, kv


def side_by_side(store: Store, tokens: int, a: argparse.Namespace, x_eval: torch.Tensor, bulk: torch.Tensor,
                 tmp: Path) -> list[dict[str, Any]]:
    d, n = store.d_model, a.expansion * store.d_model
    trainers: list[Any] = []
    names = a.trainers.split(",")
    if "sparsify" in names:
        if sparsify_available():
            for i, seed in enumerate(int(v) for v in a.sparsify_seeds.split(",")):
                sp = SparsifyDefaults(d, n, a.k, seed=seed)
                if i:  # the first seed is the reference of the ratios; the others show the seed spread
                    sp.name = f"sparsify_seed{seed}"
                trainers.append(sp)
        else:
            print("(sparsify is not installed: `pip install --no-deps eai-sparsify schedulefree einops natsort "
                  "simple-parsing docstring-parser` to compare with it)")
    variants = ([("saeforge", {})] if "saeforge" in names else []) + [parse_variant(v) for v in a.variant]
    sf = [Saeforge(nm, store, tokens, a, tmp / f"t{tokens}", kv) for nm, kv in variants]
    if "dense-adam" in names:
        tr0 = sf[0].tr if sf else Trainer(build_config(TrainConfig, {}, {
            "store": store.path, "hook": a.hook, "out": str(tmp / "dense"), "wandb": "disabled"}))
        if not sf:
            tr0._init_fresh()
        trainers.append(DenseAdam(d, n, a.k, tr0.members[0].sae.b_dec.detach(), tr0.scale, dense_adam_lr(n)))
    trainers += sf
    secs = {t.name: 0.0 for t in trainers}
    it = iter(ShuffledLoader(store, a.hook, a.batch_size, seed=0))
    first = next(it)
    for t in sf:
        if t.from_sparsify:
            sp0 = next((p for p in trainers if isinstance(p, SparsifyDefaults)), None)
            if sp0 is None:
                raise SystemExit(f"variant {t.name}: from_sparsify=1 needs sparsify in --trainers")
            t.start_from(sp0, first)
    steps = tokens // a.batch_size
    t_report = time.perf_counter()
    for s in range(steps):
        x = first if s == 0 else next(it)
        for t in trainers:
            t0 = time.perf_counter()
            t.step(x)
            secs[t.name] += time.perf_counter() - t0
        if time.perf_counter() - t_report > 60:
            t_report = time.perf_counter()
            print(f"  … step {s + 1}/{steps}", flush=True)
    rows = []
    for t in trainers:
        with torch.no_grad():
            r = evaluate(*t.encoder_decoder(), x_eval, bulk)
        rows.append({"tokens": tokens, "trainer": t.name, **r, "tok_s": steps * a.batch_size / secs[t.name]})
    return rows


def run_cli(store: Store, tokens: int, a: argparse.Namespace, x_eval: torch.Tensor, bulk: torch.Tensor,
            tmp: Path) -> dict[str, Any]:
    """`saeforge train` at its defaults (as a subprocess), then the same held-out evaluation."""
    out = tmp / f"cli{tokens}"
    cmd = [sys.executable, "-m", "sae", "train", "--store", store.path, "--hook", a.hook, "--out", str(out),
           "--k", str(a.k), "--expansion", str(a.expansion), "--tokens", str(tokens), "--batch-size",
           str(a.batch_size), "--threads", str(a.threads), "--wandb", "disabled", "--quiet"]
    p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"})
    if p.returncode:
        raise RuntimeError(f"saeforge train failed:\n{p.stderr[-3000:]}")
    rate = re.search(r"tokens at ([\d,]+) tokens/s", p.stdout)
    sae = load_sae(out)
    r = evaluate(sae.encode, sae.W_dec.detach(), sae.b_dec.detach(), x_eval, bulk)
    return {"tokens": tokens, "trainer": "cli", **r, "tok_s": float(rate.group(1).replace(",", "")) if rate else
            float("nan")}


def print_table(rows: list[dict[str, Any]]) -> None:
    ref = {r["tokens"]: r for r in rows if r["trainer"] == "sparsify"}
    print(f"\n{'tokens':>9} {'trainer':<22} {'bulk FVU':>9} {'all FVU':>8} {'L0':>6} {'dead %':>7} {'tok/s':>8}"
          f" {'bulk/sp':>8} {'all/sp':>7} {'speed/sp':>8}")
    for r in rows:
        sp = ref.get(r["tokens"])
        ratios = (f" {r['bulk_fvu'] / sp['bulk_fvu']:>8.3f} {r['all_fvu'] / sp['all_fvu']:>7.3f}"
                  f" {r['tok_s'] / sp['tok_s']:>7.2f}×") if sp else ""
        print(f"{r['tokens']:>9,} {r['trainer']:<22} {r['bulk_fvu']:>9.4f} {r['all_fvu']:>8.4f} {r['l0']:>6.1f}"
              f" {100 * r['dead']:>7.2f} {r['tok_s']:>8,.0f}{ratios}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="training store (default: collect wikitext-2 valid into --cache)")
    p.add_argument("--heldout-store", help="held-out store (default: collect wikitext-2 test into --cache)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench"), help="where collected stores are kept")
    p.add_argument("--hook", default=HOOK)
    p.add_argument("--budgets", default="200000,400000,1200000", help="training tokens, comma-separated")
    p.add_argument("--trainers", default="sparsify,dense-adam,saeforge,cli")
    p.add_argument("--variant", action="append", default=[],
                   help='extra saeforge trainer "name:field=value,…" (TrainConfig fields; lists joined by +; '
                        'from_sparsify=1 starts it from sparsify\'s initial weights)')
    p.add_argument("--sparsify-seeds", default="0",
                   help="sparsify's init seeds, comma-separated (the first is the ratios' reference; more show "
                        "the seed-to-seed spread; saeforge's: --variant NAME:seed=S)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heldout-tokens", type=int, default=65536)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    store = Store.open(a.store) if a.store else collect(DATA / "valid.txt", cache / "valid.zarr",
                                                       ["--heldout-fraction", "0"])
    held = Store.open(a.heldout_store) if a.heldout_store else collect(
        DATA / "test.txt", cache / "test.zarr", ["--heldout-fraction", "0", "--outlier-norm", "1e9",
                                                 "--max-tokens", str(a.heldout_tokens)])
    x_eval = torch.from_numpy(eval_rows(held, a.hook, a.heldout_tokens)).float()
    norms = x_eval.norm(dim=1)
    bulk = norms <= 5 * norms.median()
    n_train = int(store.split_mask("train").sum())
    print(f"train store {store.path}: {n_train:,} training rows; held-out {held.path}: {len(x_eval):,} rows "
          f"({int((~bulk).sum())} above 5× the median norm); d_sae {a.expansion * store.d_model}, k {a.k}, "
          f"batch {a.batch_size}, {a.threads} threads; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for tokens in (int(float(b)) for b in a.budgets.split(",")):
            rows += side_by_side(store, tokens, a, x_eval, bulk, tmp)
            if "cli" in a.trainers.split(","):
                rows.append(run_cli(store, tokens, a, x_eval, bulk, tmp))
            print_table([r for r in rows if r["tokens"] == tokens])
    print("\nall budgets:")
    print_table(rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
