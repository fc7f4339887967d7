"""Trainer step throughput against sparsify and a plain dense PyTorch TopK step, side by side in one run.

    python bench/train.py                                   # synthetic d=576 store
    python bench/train.py --store S.zarr --hook layers.15.resid_post
    python bench/train.py --kinds                           # each dictionary kind vs dense (bench/train_kinds.py)

Prints, for d_sae 4608 and 9216 (k 32, batch 4096, 2 threads): tokens/s of
  dense     plain PyTorch TopK SAE step: dense encoder, topk, dense decoder, autograd, Adam
  sparsify  EleutherAI's sparsify at its defaults (bench/peers.py: SparseCoder's fused encoder and
            embedding_bag decoder, gradient projection, schedule-free sign-SGD), when importable;
            also with its AuxK path on 5% dead latents
  saeforge  Trainer.train_step at its defaults (sparse decoder and sparse encoder backward, decoder
            projection, grad clip, its optimizer, dead counters); also with AuxK on 5% dead latents
timed round-robin (so background load hits all alike), then the loader's rows/s against what
the trainer consumes. Held-out quality: bench/quality.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import DenseAdam, SparsifyDefaults, dense_adam_lr, round_robin, sparsify_available  # noqa: E402
from bench.train_kinds import IN, LAYERS, OUT, add_kinds_args, bench_kinds, synthetic_kinds_store  # noqa: E402
from collect.store import Store  # noqa: E402
from sae.config import TrainConfig  # noqa: E402
from sae.loader import ShuffledLoader  # noqa: E402
from sae.synthetic import write_synthetic_store  # noqa: E402
from sae.trainer import Trainer  # noqa: E402


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
        dense = DenseAdam(store.d_model, n, k, m.sae.b_dec.detach(), tr.scale, dense_adam_lr(n))
        few = torch.zeros(n, dtype=torch.bool)
        few[: n // 20] = True

        def ours_aux() -> None:
            m.since_fired.zero_()
            m.since_fired[: n // 20] = tr.cfg.dead_after  # 5% of latents count as dead: AuxK runs
            tr.train_step(x)

        fns = {"dense": lambda: dense.step(x_raw)}
        if sparsify_available():
            sp = SparsifyDefaults(store.d_model, n, k)
            fns["sparsify"] = lambda: sp.step(x_raw)
            fns["sparsify+AuxK"] = lambda: sp.step(x_raw, few)
        fns["saeforge"] = lambda: tr.train_step(x)
        fns["saeforge+AuxK"] = ours_aux
        med = round_robin(fns, reps)
        if "sparsify" not in fns:
            print("(sparsify is not installed: `pip install --no-deps eai-sparsify schedulefree einops natsort "
                  "simple-parsing docstring-parser` to time it side by side)")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="activation store (default: a synthetic d=576 store in a temp dir)")
    p.add_argument("--hook", default="")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--buffer-rows", type=int, default=1 << 17)
    add_kinds_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if a.kinds:
            return main_kinds(a, tmp)
        if a.store:
            store = Store.open(a.store)
            hook = a.hook or store.hooks[0]
        else:
            print("writing a synthetic store (d=576, 196,608 rows, float16)…")
            store = write_synthetic_store(str(tmp / "syn.zarr"), n_tokens=196608, d=576, n_features=8192, active=24,
                                          context=256, shard_rows=32768, dtype="float16")
            hook = store.hooks[0]
        print(f"store {store.path}: {store.n_tokens:,} rows, d={store.d_model}, hook {hook}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        bench_speed(store, hook, a, tmp)
    return 0


def main_kinds(a: argparse.Namespace, tmp: Path) -> int:
    if a.store:
        store = Store.open(a.store)
        hook, target, hooks = a.hook or store.hooks[0], a.target, [h for h in a.hooks.split(",") if h]
    else:
        print(f"writing a synthetic store (d=576, {a.tokens:,} rows, float16, hook points {IN}, {OUT}, "
              f"{LAYERS[0]}…{LAYERS[-1]})…")
        store = synthetic_kinds_store(str(tmp / "kinds.zarr"), n_tokens=a.tokens)
        hook, target, hooks = IN, OUT, LAYERS
    print(f"store {store.path}: {store.n_tokens:,} rows, d={store.d_model}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    bench_kinds(store, hook, target, hooks, a.k, a.expansion, a.batch_size, a.reps, tmp)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
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
