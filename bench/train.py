"""Trainer throughput and quality against a plain dense PyTorch TopK step, side by side in one run.

    python bench/train.py                                   # synthetic d=576 store
    python bench/train.py --store S.zarr --hook layers.15.resid_post --quality-tokens 400000

Prints, for d_sae 4608 and 9216 (k 32, batch 4096, Adam, 2 threads): tokens/s of
  dense     plain PyTorch TopK SAE step: dense encoder, topk, dense decoder, autograd, Adam
  sparsify  EleutherAI's sparsify SparseCoder step (fused encoder with index_add backward,
            embedding_bag decoder, gradient projection, clip, Adam), when `sparsify` is importable
  saeforge  Trainer.train_step (sparse decoder and sparse encoder backward, fused Adam, decoder
            projection, grad clip, dead counters); also with AuxK running on 50% dead latents
timed round-robin (so background load hits all alike), then the loader's rows/s against what
the trainer consumes, and optionally held-out FVU after the same tokens (saeforge vs dense).
"""
from __future__ import annotations

import argparse
import math
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collect.store import ShardPlan, Store, StoreWriter  # noqa: E402
from sae.config import TrainConfig  # noqa: E402
from sae.init import geometric_median  # noqa: E402
from sae.loader import ShuffledLoader, heldout_rows, sample_rows  # noqa: E402
from sae.synthetic import write_synthetic_store  # noqa: E402
from sae.trainer import Trainer  # noqa: E402


class DenseTopK(torch.nn.Module):
    """The plain reference: what a first implementation of a TopK SAE looks like."""

    def __init__(self, d: int, n: int, k: int, b_dec: torch.Tensor, sparse_decoder: bool = False):
        super().__init__()
        w = torch.randn(n, d)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.k, self.sparse_decoder = k, sparse_decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        v, i = pre.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter(1, i, v)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        v, i = pre.topk(self.k, dim=1, sorted=False)
        if self.sparse_decoder:  # sparsify's eager CPU decoder
            recon = F.embedding_bag(i, self.W_dec, per_sample_weights=v, mode="sum") + self.b_dec
        else:
            recon = torch.zeros_like(pre).scatter(1, i, v) @ self.W_dec + self.b_dec
        return (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def dense_step(model: DenseTopK, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = model.loss(x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def sparsify_stepper(d: int, n: int, k: int, b_dec: torch.Tensor, lr: float):
    """One training step of EleutherAI's sparsify (its Trainer's inner loop with Adam), or None."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sc.b_dec.copy_(b_dec)
    opt = torch.optim.Adam(sc.parameters(), lr=lr)

    def step(x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> None:
        out = sc(x, dead_mask=dead_mask)
        (out.fvu + out.auxk_loss / 32).backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sc.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sc.set_decoder_norm_to_unit_norm()
    step.coder = sc  # type: ignore[attr-defined]
    return step


def make_trainer(store: Store, hook: str, expansion: int, k: int, batch: int, out: Path, tokens: int) -> Trainer:
    cfg = TrainConfig(store=store.path, hook=hook, out=str(out), k=[k], expansion=[expansion], tokens=tokens,
                      batch_size=batch, wandb="disabled", quiet=True, eval_every=0, checkpoint_every=0,
                      scale_sample=16384)
    return Trainer(cfg)


def bench_steps(store: Store, hook: str, k: int, batch: int, reps: int, tmp: Path) -> dict[int, float]:
    x_raw = next(iter(ShuffledLoader(store, hook, batch, seed=1)))
    rates: dict[int, float] = {}
    for expansion in (8, 16):
        n = expansion * store.d_model
        tr = make_trainer(store, hook, expansion, k, batch, tmp / f"o{n}", tokens=batch * 10_000)
        tr._init_fresh()
        x = x_raw * tr.scale
        m = tr.members[0]
        dense = DenseTopK(store.d_model, n, k, m.sae.b_dec.detach())
        opt_d = torch.optim.Adam(dense.parameters(), lr=1e-4)
        half = torch.zeros(n, dtype=torch.bool)
        half[: n // 20] = True

        def ours_aux() -> None:
            m.since_fired.zero_()
            m.since_fired[: n // 20] = tr.cfg.dead_tokens  # 5% of latents count as dead: AuxK runs
            tr.train_step(x)

        fns = {"dense": lambda: dense_step(dense, opt_d, x)}
        sp = sparsify_stepper(store.d_model, n, k, m.sae.b_dec.detach(), m.spec.lr)
        if sp is not None:
            fns["sparsify"] = lambda: sp(x)
            fns["sparsify+AuxK"] = lambda: sp(x, half)
        fns["saeforge"] = lambda: tr.train_step(x)
        fns["saeforge+AuxK"] = ours_aux
        times: dict[str, list[float]] = {name: [] for name in fns}
        for f in fns.values():  # warm-up (allocations, Adam state)
            f()
        for _ in range(reps):
            for name, f in fns.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        if sp is None:
            print("(sparsify is not installed: `pip install eai-sparsify` to time it side by side)")
        print(f"\nd={store.d_model} d_sae={n} k={k} batch={batch} threads={torch.get_num_threads()} "
              f"(median of {reps} round-robin steps; AuxK rows: 5% of latents dead)")
        for name, s in med.items():
            vs = f"   {med['sparsify'] / s:5.2f}× sparsify" if "sparsify" in med else ""
            print(f"  {name:<15} {batch / s:>9,.0f} tokens/s   {s * 1000:7.0f} ms/step   "
                  f"{med['dense'] / s:5.2f}× dense{vs}")
        rates[n] = batch / med["saeforge"]
    return rates


def bench_loader(store: Store, hook: str, batch: int, buffer_rows: int) -> tuple[float, float]:
    """(rows/s the prefetch thread fills buffers at: chunk reads + keep/heldout filter + shuffle,
    rows/s a consumer gets over two epochs through the iterator)."""
    loader = ShuffledLoader(store, hook, batch, seed=2, buffer_rows=buffer_rows)
    groups = loader._epoch_groups(0)
    t = time.perf_counter()
    rows = sum(len(loader._load(g)) for g in groups)
    fill = rows / (time.perf_counter() - t)
    n_batches = 2 * loader.n_rows // batch
    it = iter(loader)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return fill, n_batches * batch / (time.perf_counter() - t)


def bench_quality(store: Store, hook: str, k: int, expansion: int, batch: int, tokens: int, tmp: Path) -> None:
    """Held-out FVU after the same tokens: saeforge's trainer vs the dense reference with the same
    init, data order, lr and schedule-free Adam (the plain recipe)."""
    tr = make_trainer(store, hook, expansion, k, batch, tmp / "quality", tokens)
    t = time.perf_counter()
    res = tr.run()
    t_ours = time.perf_counter() - t
    ours = next(iter(res.metrics.values()))
    lr = tr.members[0].spec.lr
    held = torch.from_numpy(heldout_rows(store, hook, tr.cfg.eval_rows)) * tr.scale
    n = expansion * store.d_model
    torch.manual_seed(0)
    sample = torch.from_numpy(sample_rows(store, hook, tr.cfg.scale_sample, tr.cfg.seed)) * tr.scale
    dense = DenseTopK(store.d_model, n, k, geometric_median(sample[:16384]))
    opt = torch.optim.Adam(dense.parameters(), lr=lr)
    it = iter(ShuffledLoader(store, hook, batch, seed=tr.cfg.seed))
    t = time.perf_counter()
    for _ in range(tokens // batch):
        dense_step(dense, opt, next(it) * tr.scale)
    t_dense = time.perf_counter() - t
    with torch.no_grad():
        f = dense.encode(held)
        dense_fvu = float((dense.decode(f) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    sp_line = ""
    sp_lr = 2e-4 / math.sqrt(n / 16384)  # sparsify's own default rule
    sp = sparsify_stepper(store.d_model, n, k, geometric_median(sample[:16384]), sp_lr)
    if sp is not None:
        it = iter(ShuffledLoader(store, hook, batch, seed=tr.cfg.seed))
        t = time.perf_counter()
        for _ in range(tokens // batch):
            sp(next(it) * tr.scale)
        t_sp = time.perf_counter() - t
        sc = sp.coder
        with torch.no_grad():
            out = sc(held)
            sp_fvu = float((out.sae_out - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
        sp_line = (f"  sparsify  FVU {sp_fvu:.4f}  L0 {k}  ({tokens / t_sp:,.0f} tokens/s; its step with Adam at its "
                   f"default lr {sp_lr:.2e}, constant; same b_dec init and data order)")
    print(f"\nheld-out FVU after {tokens:,} tokens (d_sae {n}, k {k}, lr {lr:.2e}, {len(held)} held-out rows, "
          f"keep=True only):")
    print(f"  saeforge  FVU {ours['heldout_fvu']:.4f}  L0 {ours['heldout_l0']:.1f}  dead {ours['heldout_dead_fraction']:.3f}"
          f"  ({tokens / t_ours:,.0f} tokens/s end to end, loader and evaluation included)")
    print(f"  dense     FVU {dense_fvu:.4f}  L0 {k}  ({tokens / t_dense:,.0f} tokens/s; plain Adam at the same lr, "
          f"same b_dec init and data order, no AuxK/schedule/projection)")
    if sp_line:
        print(sp_line)


def with_heldout(store: Store, hook: str, path: str, every: int) -> Store:
    """A copy of one hook of `store` with every `every`-th sequence marked held out (for partial
    collections whose held-out documents come later); keep and everything else unchanged."""
    drop = ("format", "format_version", "n_tokens", "complete", "chunk_rows", "shard_rows")
    attrs = {**{k: v for k, v in store.attrs.items() if k not in drop}, "hook_points": [hook]}
    w = StoreWriter(path, attrs, ShardPlan(chunk_rows=store.chunk_rows, shard_rows=store.shard_rows))
    for s in range(0, store.n_tokens, store.shard_rows):
        e = min(s + store.shard_rows, store.n_tokens)
        seq = store.seq(s, e)
        w.write(s, {hook: store.raw_activations(hook, s, e), "tokens": store.tokens(s, e), "seq": seq,
                    "pos": store.pos(s, e), "keep": store.keep(s, e), "heldout": (seq % every) == every - 1})
    w.finish()
    return Store.open(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="activation store (default: a synthetic d=576 store in a temp dir)")
    p.add_argument("--hook", default="")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--buffer-rows", type=int, default=1 << 17)
    p.add_argument("--quality-tokens", type=int, default=0, help="also compare held-out FVU after this many tokens")
    p.add_argument("--no-speed", action="store_true", help="skip the step and loader timings")
    p.add_argument("--heldout-every", type=int, default=20,
                   help="for a store without held-out rows: hold out every N-th sequence of a copy")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if a.store:
            store = Store.open(a.store)
            hook = a.hook or store.hooks[0]
            if a.quality_tokens and not store.split_mask("heldout").any():
                print(f"store has no held-out rows yet: evaluating on every {a.heldout_every}th sequence of a "
                      f"temporary copy, never trained on")
                store = with_heldout(store, hook, str(tmp / "heldout_copy.zarr"), a.heldout_every)
        else:
            print("writing a synthetic store (d=576, 196,608 rows, float16)…")
            store = write_synthetic_store(str(tmp / "syn.zarr"), n_tokens=196608, d=576, n_features=8192, active=24,
                                          context=256, shard_rows=32768, dtype="float16")
            hook = store.hooks[0]
        print(f"store {store.path}: {store.n_tokens:,} rows, d={store.d_model}, hook {hook}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if not a.no_speed:
            bench_speed(store, hook, a, tmp)
        if a.quality_tokens:
            bench_quality(store, hook, a.k, 8, a.batch_size, a.quality_tokens, tmp)
    return 0


def bench_speed(store: Store, hook: str, a: argparse.Namespace, tmp: Path) -> None:
    rates = bench_steps(store, hook, a.k, a.batch_size, a.reps, tmp)
    fill, rows = bench_loader(store, hook, a.batch_size, a.buffer_rows)
    print(f"\nloader: buffers fill at {fill:,.0f} rows/s (whole-chunk reads, keep & ~heldout filter, "
          f"shuffle; {store.dtype} → float32); iterator delivers {rows:,.0f} rows/s over two epochs")
    print("  trainer consumes " + ", ".join(f"{r:,.0f} tokens/s at d_sae {n}" for n, r in rates.items())
          + f" → the loader has {fill / max(rates.values()):.0f}× headroom")


if __name__ == "__main__":
    sys.exit(main())
