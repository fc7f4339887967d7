"""The GPU path measured on one CUDA device, side by side in one run (bench/gpu.sh runs it).

    python bench/gpu.py                  # needs CUDA; ≤ 5 minutes on one GPU
    SAEFORGE_BENCH_DRY=1 python bench/gpu.py   # the same code at toy size on CPU (a smoke test only)

1. Collection, SmolLM2-135M (bf16), layers.15.resid_post, context 128, batch 64: tokens/s of
   `bare` (the model's blocks 0..15 alone, no hooks, no storage) and `collect` (saeforge's collector
   writing a bf16 store: its loop seconds), best of two interleaved repetitions, and collect/bare.
2. Training on that store, TopK k=64 at d_sae = 114 × 576 = 65,664 (the integer expansion nearest
   65,536 for SmolLM2's d_model 576), batch 4,096: tokens/s of sparsify at its defaults (its Triton
   decoder when Triton is installed), saeforge in float32 and saeforge --dtype bfloat16, each on the
   same batches in the same order (a warm-up of 5 steps not timed; every step bracketed by
   torch.cuda.synchronize), the peak CUDA memory each one allocated above what was resident before
   it started, and held-out FVU on 4,096 rows (so speed is not bought with quality).
Fails (exit 1, one line) without CUDA unless SAEFORGE_BENCH_DRY=1.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import SparsifyDefaults, sparsify_available  # noqa: E402
from bench.quality import Saeforge, evaluate  # noqa: E402
from collect.collector import CollectConfig, collect_activations  # noqa: E402
from collect.corpus import load_documents, pack_sequences  # noqa: E402
from collect.layers import discover_layout  # noqa: E402
from collect.model import ModelDtype, load_model  # noqa: E402
from collect.store import Store  # noqa: E402
from sae.loader import ShuffledLoader, heldout_rows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
DRY = os.environ.get("SAEFORGE_BENCH_DRY") == "1"
# (collect tokens, collect batch, train expansion, k, train batch, train tokens)
SIZE = dict(tokens=1024, batch=8, expansion=2, k=8, train_batch=512, train_tokens=512 * 12) if DRY else \
    dict(tokens=64 * 128 * 160, batch=64, expansion=114, k=64, train_batch=4096, train_tokens=4096 * 200)
LAYER, CONTEXT, WARMUP = 15, 128, 5
MODEL_DTYPE: ModelDtype = "float32" if DRY else "bfloat16"  # bf16 matmuls crawl on CPUs without AVX-512-BF16


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mib(device: str, base: int) -> float:
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if device.startswith("cuda") else float("nan")


def bench_collect(device: str, corpus: Path, tmp: Path) -> Store:
    loaded = load_model("smollm2-135m", device=device, dtype=MODEL_DTYPE)
    model, tok = loaded.model, loaded.tokenizer
    layout = discover_layout(model)
    n_seq = SIZE["tokens"] // CONTEXT
    seqs = list(itertools.islice(pack_sequences(load_documents(str(corpus)), tok, CONTEXT), n_seq))
    n_seq = len(seqs)
    batches = [torch.from_numpy(np.stack([s.tokens for s in seqs[i:i + SIZE["batch"]]]).astype(np.int64)).to(device)
               for i in range(0, n_seq, SIZE["batch"])]
    base = model.get_submodule(layout.blocks[0].rsplit(".", 2)[0])  # e.g. model.model
    blocks = model.get_submodule(layout.blocks[0].rsplit(".", 1)[0])  # the ModuleList
    with torch.no_grad():
        model(input_ids=batches[0][:1])  # warm-up (kernels, allocator)

    def bare() -> float:
        full = list(blocks.children())
        blocks._modules = {str(i): m for i, m in enumerate(full[: LAYER + 1])}
        try:
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                for ids in batches:
                    base(input_ids=ids, use_cache=False)
            sync(device)
            return time.perf_counter() - t0
        finally:
            blocks._modules = {str(i): m for i, m in enumerate(full)}

    def collector(rep: int) -> tuple[float, Store]:
        cfg = CollectConfig(corpus=str(corpus), hooks=[f"layers.{LAYER}.resid_post"], context=CONTEXT,
                            max_tokens=n_seq * CONTEXT, batch_size=SIZE["batch"], dtype="bfloat16",
                            model_dtype=MODEL_DTYPE, device=device, heldout_fraction=0.05,
                            out=str(tmp / f"c{rep}.zarr"), quiet=True)
        store = collect_activations(cfg, loaded=loaded)
        return float(store.attrs["loop_seconds"]), store

    t_bare, t_coll, store = [], [], None
    for rep in range(2):  # interleaved, best of two
        t_bare.append(bare())
        t, store = collector(rep)
        t_coll.append(t)
    n_tok = n_seq * CONTEXT
    r_bare, r_coll = n_tok / min(t_bare), n_tok / min(t_coll)
    print(f"[collect] SmolLM2-135M {MODEL_DTYPE}, layers.{LAYER}.resid_post, {n_tok:,} tokens, context {CONTEXT}, "
          f"batch {SIZE['batch']}, {device}")
    print(f"  bare     {r_bare:>14,.0f} tokens/s")
    print(f"  collect  {r_coll:>14,.0f} tokens/s   collect/bare = {r_coll / r_bare:.3f}")
    assert store is not None  # the model and its batches are freed on return
    return store


def bench_train(device: str, store: Store, tmp: Path) -> list[dict[str, Any]]:
    hook = store.hooks[0]
    d = store.d_model
    n, k, batch = SIZE["expansion"] * d, SIZE["k"], SIZE["train_batch"]
    steps = SIZE["train_tokens"] // batch
    batches = list(itertools.islice(iter(ShuffledLoader(store, hook, batch, seed=0)), steps))
    x_eval = torch.from_numpy(heldout_rows(store, hook, 4096)).to(device)
    if len(x_eval) == 0:  # a dry run's toy store may hold no held-out document
        print("  (no held-out rows in this store: FVU below is on training rows)")
        x_eval = torch.from_numpy(store.activations(hook, 0, min(store.n_tokens, 4096))).to(device)
    ns = argparse.Namespace(hook=hook, k=k, expansion=SIZE["expansion"], batch_size=batch, threads=0)

    def saeforge(dtype: str) -> Callable[[], Any]:
        return lambda: Saeforge(f"saeforge-{dtype}", store, SIZE["train_tokens"], ns, tmp,
                                {"device": device, "dtype": dtype})

    makers: list[tuple[str, Callable[[], Any]]] = []
    if sparsify_available():
        makers.append(("sparsify", lambda: SparsifyDefaults(d, n, k, device=device)))
    else:
        print("  (sparsify is not installed: `pip install --no-deps eai-sparsify schedulefree einops natsort "
              "simple-parsing docstring-parser` to compare with it)")
    makers += [(f"saeforge-{dt}", saeforge(dt)) for dt in ("float32", "bfloat16")]
    rows: list[dict[str, Any]] = []
    for name, make in makers:  # one after another on the same batches: a clean peak per trainer
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        t = make()
        secs = 0.0
        for i, xb in enumerate(batches):
            x = xb.to(device, non_blocking=True)
            sync(device)
            t0 = time.perf_counter()
            t.step(x)
            sync(device)
            if i >= WARMUP:
                secs += time.perf_counter() - t0
        enc, W_dec, b_dec = t.encoder_decoder()
        owner = getattr(enc, "__self__", None)  # saeforge's: the encode method of an SAE loaded on the CPU
        if isinstance(owner, torch.nn.Module):
            owner.to(device)
        with torch.no_grad():
            q = evaluate(enc, W_dec.to(device), b_dec.to(device), x_eval, torch.ones(len(x_eval), dtype=torch.bool))
        rows.append({"trainer": name, "tok_s": (steps - WARMUP) * batch / secs, "peak_mib": peak_mib(device, base),
                     "fvu": q["all_fvu"], "l0": q["l0"]})
        del t, enc, W_dec, b_dec
    print(f"[train] TopK k={k}, d_sae={n:,} ({SIZE['expansion']} × {d}), batch {batch}, {steps} steps "
          f"({WARMUP} warm-up), {device}")
    print(f"  {'trainer':<18}{'tokens/s':>14}{'peak MiB':>11}{'FVU':>8}{'L0':>7}")
    for r in rows:
        print(f"  {r['trainer']:<18}{r['tok_s']:>14,.0f}{r['peak_mib']:>11,.0f}{r['fvu']:>8.3f}{r['l0']:>7.1f}")
    ref = next((r for r in rows if r["trainer"] == "sparsify"), None)
    if ref is not None:
        for r in rows[1:]:
            print(f"  {r['trainer']} / sparsify: {r['tok_s'] / ref['tok_s']:.2f}× tokens/s")
    return rows


def main() -> int:
    if not DRY and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device (torch.cuda.is_available() is False); "
              "SAEFORGE_BENCH_DRY=1 runs it at toy size on CPU", file=sys.stderr)
        return 1
    device = "cpu" if DRY else "cuda"
    if not DRY:
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        store = bench_collect(device, DATA / "test.txt", Path(d))
        bench_train(device, Store.open(store.path), Path(d))
    print(f"total {time.perf_counter() - t0:.0f} s{' (dry run: toy sizes on CPU, not a measurement)' if DRY else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
