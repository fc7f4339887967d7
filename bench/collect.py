"""Collector throughput on SmolLM2, measured side by side on the same batches in one run.

    python bench/collect.py [--layer 15] [--tokens 16384] [--context 128] [--batch-size 8]

Prints tokens/s for
  bare     the model's own blocks 0..layer (no hooks, no storage, no LM head)
  collect  saeforge's collector writing float16 shards to a Zarr store (its batch loop)
  naive    a full forward with output_hidden_states=True, then numpy.save of the layer
and the ratios collect/bare and collect/naive, next to the FLOP-bound rate from a matmul
measured on this machine.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from collect.collector import CollectConfig, collect_activations  # noqa: E402
from collect.corpus import load_documents, pack_sequences  # noqa: E402
from collect.layers import discover_layout  # noqa: E402
from collect.model import load_model  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def matmul_gflops(seconds: float = 2.0) -> float:
    """fp32 GEMM rate at a shape like the model's projections."""
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9


def flops_per_token(model: torch.nn.Module, blocks: list[str], upto: int, context: int) -> float:
    """2·params of blocks 0..upto, plus attention scores and mixing (2·2·ctx/2·d per layer)."""
    d = model.config.hidden_size
    params = sum(p.numel() for b in blocks[: upto + 1] for p in model.get_submodule(b).parameters())
    return 2 * params + (upto + 1) * 4 * (context / 2) * d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--corpus", default=str(DATA))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    layout = discover_layout(model)
    hook = f"layers.{args.layer}.resid_post"
    docs = load_documents(args.corpus)
    n_seq = args.tokens // args.context
    seqs = list(itertools.islice(pack_sequences(docs, tok, args.context), n_seq))
    batches = [torch.from_numpy(np.stack([s.tokens for s in seqs[i:i + args.batch_size]]).astype(np.int64))
               for i in range(0, n_seq, args.batch_size)]
    n_tok = n_seq * args.context
    base = model.get_submodule(layout.blocks[0].rsplit(".", 2)[0])  # e.g. model.model
    blocks = model.get_submodule(layout.blocks[0].rsplit(".", 1)[0])  # the ModuleList
    with torch.no_grad():
        model(input_ids=batches[0][:1])  # warm-up

    def bare() -> float:
        full = list(blocks)
        blocks._modules = {str(i): m for i, m in enumerate(full[: args.layer + 1])}
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                for ids in batches:
                    base(input_ids=ids, use_cache=False)
            return time.perf_counter() - t0
        finally:
            blocks._modules = {str(i): m for i, m in enumerate(full)}

    def naive(tmp: Path) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for i, ids in enumerate(batches):
                hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
                np.save(tmp / f"b{i}.npy", hs[args.layer + 1].reshape(-1, hs[0].shape[-1]).numpy().astype(np.float16))
        return time.perf_counter() - t0

    def collector(tmp: Path, rep: int) -> float:
        cfg = CollectConfig(corpus=args.corpus, hooks=[hook], context=args.context, max_tokens=n_tok,
                            batch_size=args.batch_size, heldout_fraction=0.0, out=str(tmp / f"c{rep}.zarr"),
                            quiet=True)
        store = collect_activations(cfg, loaded=loaded)
        assert store.n_tokens == n_tok, (store.n_tokens, n_tok)
        return float(store.attrs["loop_seconds"])

    results: dict[str, list[float]] = {"bare": [], "collect": [], "naive": []}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(2):  # interleaved, best of two, so drift hits all three alike
            results["bare"].append(bare())
            results["collect"].append(collector(Path(d), rep))
            results["naive"].append(naive(Path(d)))
    rate = {k: n_tok / min(v) for k, v in results.items()}
    gflops = matmul_gflops()
    bound = gflops * 1e9 / flops_per_token(model, layout.blocks, args.layer, args.context)
    print(f"SmolLM2-135M, {hook}, {n_tok:,} tokens, context {args.context}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, float16 store")
    print(f"{'run':<10}{'tokens/s':>12}")
    for k in ("bare", "collect", "naive"):
        print(f"{k:<10}{rate[k]:>12,.0f}")
    print(f"collect / bare  = {rate['collect'] / rate['bare']:.3f}")
    print(f"collect / naive = {rate['collect'] / rate['naive']:.2f}")
    print(f"FLOP bound: {gflops:.1f} GFLOP/s fp32 matmul / {flops_per_token(model, layout.blocks, args.layer, args.context) / 1e6:.1f} "
          f"MFLOP per token = {bound:,.0f} tokens/s; collect reaches {rate['collect'] / bound:.0%} of it")


if __name__ == "__main__":
    main()
