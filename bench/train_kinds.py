"""`bench/train.py --kinds`: each dictionary kind's training step beside a dense PyTorch step of its shapes.

Kinds (saeforge's Trainer.train_step at its defaults, on one batch of the store):
  topk SAE          --hook → --hook
  matryoshka        BatchTopK whose nested prefixes (the default 5 groups) each reconstruct --hook
  transcoder        --hook → --target (e.g. layers.0.mlp_in → layers.0.mlp_out: d_in = d_out)
  skip-transcoder   the same + a learned linear skip term
  crosscoder L=2/4  one shared TopK code of the first 2 / 4 of --hooks, decoded into all of them
Each beside bench/peers.py's DenseAdam made for the same shapes: dense encoder matmul, topk (BatchTopK
for Matryoshka), dense decoder(s) to every output, autograd, Adam. All steps are timed round-robin in
one loop, so background load hits every kind and its reference alike.
"""
from __future__ import annotations

import argparse
import functools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.peers import DenseAdam, dense_adam_lr, round_robin
from collect.store import Store
from sae.config import TrainConfig
from sae.loader import ShuffledLoader
from sae.synthetic import planted_dictionary, planted_rows, write_synthetic_store
from sae.trainer import Trainer

IN, OUT = "layers.0.mlp_in", "layers.0.mlp_out"
LAYERS = [f"layers.{i}.resid_post" for i in range(4)]


def synthetic_kinds_store(path: str, n_tokens: int = 32768, d: int = 576, n_features: int = 8192,
                          active: int = 24) -> Store:
    """A float16 store of mlp_in, mlp_out and four resid_post hook points whose rows share one planted
    sparse code (each hook point its own dictionary), as a transcoder's and a crosscoder's data are related."""
    hooks = [IN, OUT, *LAYERS]
    dicts, offsets = zip(*(planted_dictionary(d, n_features, seed=100 + j) for j in range(len(hooks))))
    rows = planted_rows(n_tokens, list(dicts), list(offsets), active, seed=0)
    return write_synthetic_store(path, n_tokens=n_tokens, d=d, context=256, shard_rows=min(8192, n_tokens), dtype="float16",
                                 rows=dict(zip(hooks, rows)))


def kinds(hook: str, target: str, hooks: list[str]) -> dict[str, dict[str, Any]]:
    """TrainConfig fields of each kind the store's hook points allow."""
    out: dict[str, dict[str, Any]] = {"topk SAE": dict(hook=hook), "matryoshka": dict(hook=hook, arch=["matryoshka"])}
    if target:
        out["transcoder"] = dict(hook=hook, target=target)
        out["skip-transcoder"] = dict(hook=hook, target=target, skip=True)
    for L in (2, 4):
        if len(hooks) >= L:
            out[f"crosscoder L={L}"] = dict(hooks=hooks[:L], arch=["crosscoder"])
    return out


@dataclass
class KindSetup:
    """One kind ready to time: its Trainer (fresh), the dense reference of its shapes, one batch."""
    name: str
    trainer: Trainer
    dense: DenseAdam
    x: torch.Tensor
    y: torch.Tensor | None

    @property
    def shapes(self) -> str:
        a = self.trainer.members[0].sae.cfg
        groups = f", {len(a.group_sizes)} groups" if a.group_sizes else ""
        return f"{a.width}→{a.width if self.y is None else self.y.shape[1]}{groups}"


def kind_setups(store: Store, hook: str, target: str, hooks: list[str], k: int, expansion: int, batch: int,
                tmp: Path) -> list[KindSetup]:
    """Each kind's trainer at its defaults, the dense reference (its b_dec and a transcoder's b_in) and
    the same first batch of the store, scaled as the trainer scales it."""
    out = []
    for name, kw in kinds(hook, target, hooks).items():
        cfg = TrainConfig(store=store.path, out=str(tmp / name.replace(" ", "_").replace("=", "")), k=[k],
                          expansion=[expansion], tokens=batch * 10_000, batch_size=batch, wandb="disabled",
                          quiet=True, eval_every=0, checkpoint_every=0, scale_sample=16384, **kw)
        tr = Trainer(cfg)
        tr._init_fresh()
        x, y = tr._split(tr._scaled(next(iter(ShuffledLoader(store, tr.data_hooks, batch, seed=1)))))
        sae = tr.members[0].sae
        a = sae.cfg
        dense = DenseAdam(a.width, a.d_sae, k, sae.b_dec.detach(), 1.0, dense_adam_lr(a.d_sae), n_layers=a.n_layers,
                          b_in=typing.cast(torch.Tensor, sae.b_in) if a.transcoder else None, skip=a.skip,
                          groups=a.group_sizes)
        out.append(KindSetup(name, tr, dense, x, y))
    return out


def bench_kinds(store: Store, hook: str, target: str, hooks: list[str], k: int, expansion: int, batch: int,
                reps: int, tmp: Path) -> dict[str, tuple[float, float]]:
    """{kind: (saeforge tokens/s, dense tokens/s)}, printed as a table with the ratio."""
    setups = kind_setups(store, hook, target, hooks, k, expansion, batch, tmp)
    fns: dict[str, Callable[[], object]] = {}
    for su in setups:
        fns[f"{su.name}/saeforge"] = functools.partial(su.trainer.train_step, su.x, su.y)
        fns[f"{su.name}/dense"] = functools.partial(su.dense.step, su.x, su.y)
    shapes = {su.name: su.shapes for su in setups}
    med = round_robin(fns, reps)
    print(f"\nkinds: d={store.d_model} d_sae={expansion * store.d_model} k={k} batch={batch} "
          f"threads={torch.get_num_threads()} (median of {reps} round-robin steps; dense = plain PyTorch of the same "
          f"shapes: dense encoder, topk, dense decoder(s), autograd, Adam)")
    print(f"  {'kind':<17} {'widths':<18} {'saeforge tok/s':>14} {'dense tok/s':>12} {'saeforge/dense':>15}")
    rates = {}
    for name, shape in shapes.items():
        ours, dense_s = batch / med[f"{name}/saeforge"], batch / med[f"{name}/dense"]
        rates[name] = (ours, dense_s)
        print(f"  {name:<17} {shape:<18} {ours:>14,.0f} {dense_s:>12,.0f} {ours / dense_s:>14.2f}×")
    return rates


def add_kinds_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", action="store_true",
                   help="time each dictionary kind (topk SAE, matryoshka, transcoder, skip-transcoder, crosscoder "
                        "over 2 and 4 layers) beside a dense reference of its shapes, instead of the trainer part")
    p.add_argument("--target", default="", help="--kinds with --store: the transcoders' target hook point")
    p.add_argument("--hooks", default="", help="--kinds with --store: comma-separated crosscoder hook points "
                                               "(the first 2 and the first 4 are timed)")
    p.add_argument("--expansion", type=int, default=8, help="--kinds: d_sae = expansion × d")
    p.add_argument("--tokens", type=int, default=32768, help="--kinds: rows of the synthetic store")
