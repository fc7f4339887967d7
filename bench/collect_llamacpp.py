"""The llama.cpp collector vs the PyTorch collector on SmolLM2, the same batches, one run.

    python bench/collect_llamacpp.py [--layer 15] [--tokens 16384] [--context 128] [--batch-size 8]

Each collection runs in its own child process (so each peak RSS is its own: the model as loaded, the
activations, the shard buffers), interleaved torch, llama.cpp, torch, llama.cpp; the best loop time
of each counts. Both write float16 stores of the same packed sequences (the bench checks that the
tokens are identical) with the same thread count. Prints tokens/s, peak RSS, the ratios, and how close
the llama.cpp activations (Q4_1 weights) are to PyTorch's (float32 de-quantised).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def child(args: argparse.Namespace) -> None:
    """Collect once with one backend; print loop seconds and peak RSS as JSON."""
    import torch

    from collect.collector import CollectConfig, collect_activations
    torch.set_num_threads(args.threads)
    cfg = CollectConfig(corpus=args.corpus, hooks=[f"layers.{args.layer}.resid_post"], context=args.context,
                        max_tokens=args.tokens, batch_size=args.batch_size, heldout_fraction=0.0, out=args.out,
                        backend=args.child, quiet=True)
    store = collect_activations(cfg)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loop_seconds": store.attrs["loop_seconds"], "loop_tokens": store.attrs["loop_tokens"],
                      "peak_rss_mb": peak_mb, "n_tokens": store.n_tokens}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="threads for both backends (0: torch's default)")
    ap.add_argument("--corpus", default=str(DATA))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.threads:
        import torch
        args.threads = torch.get_num_threads()
    if args.child:
        return child(args)

    from collect.llamacpp import available
    why = available()
    if why:
        sys.exit(f"bench needs the llama.cpp bindings: {why}")
    from collect.store import Store
    runs: dict[str, list[dict]] = {"torch": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.reps):
            for backend in runs:
                out = f"{d}/{backend}-{rep}.zarr"
                cmd = [sys.executable, __file__, "--child", backend, "--out", out, "--layer", str(args.layer),
                       "--tokens", str(args.tokens), "--context", str(args.context), "--batch-size",
                       str(args.batch_size), "--threads", str(args.threads), "--corpus", args.corpus]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    sys.exit(f"{backend} run failed:\n{res.stderr[-3000:]}")
                runs[backend].append({**json.loads(res.stdout.strip().splitlines()[-1]), "out": out})
        a, b = Store.open(runs["torch"][0]["out"]), Store.open(runs["llama.cpp"][0]["out"])
        hook = f"layers.{args.layer}.resid_post"
        same = bool(np.array_equal(a.tokens(), b.tokens()))
        keep = a.keep() & b.keep()
        x, y = a.activations(hook)[keep], b.activations(hook)[keep]
        cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
        quant = b.attrs.get("quantization")
    rate = {k: v[0]["loop_tokens"] / min(r["loop_seconds"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    print(f"SmolLM2-135M, {hook}, {args.tokens:,} tokens, context {args.context}, batch {args.batch_size}, "
          f"{args.threads} threads, float16 store; best of {args.reps}, interleaved")
    print(f"{'backend':<22}{'tokens/s':>10}{'peak RSS MB':>13}")
    print(f"{'torch (float32)':<22}{rate['torch']:>10,.0f}{peak['torch']:>13,.0f}")
    print(f"{'llama.cpp (' + str(quant) + ')':<22}{rate['llama.cpp']:>10,.0f}{peak['llama.cpp']:>13,.0f}")
    print(f"llama.cpp / torch: {rate['llama.cpp'] / rate['torch']:.2f}× tokens/s, "
          f"{peak['llama.cpp'] / peak['torch']:.2f}× peak memory")
    print(f"same tokens in both stores: {same}; cosine llama.cpp vs torch over kept rows: median "
          f"{np.median(cos):.5f}, 1st percentile {np.percentile(cos, 1):.5f}")


if __name__ == "__main__":
    main()
