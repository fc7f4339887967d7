"""The trainers saeforge is compared with, each one step at a time on a batch of raw activations.

  SparsifyDefaults  EleutherAI sparsify at its real defaults, through its own code: SparseCoder
                    (nn.Linear encoder init, decoder = unit-norm copy), schedulefree's
                    ScheduleFreeWrapper over sparsify.sign_sgd.SignSGD (momentum 0.95), lr
                    5e-3/√(d_sae/2¹⁴), b_dec = mean of the first batch, unit-norm decoder set before
                    every forward, gradient parallel to decoder rows removed, no AuxK (auxk_alpha 0),
                    no warm-up, raw (unscaled) activations; optimizer.eval() for evaluation.
  DenseAdam         a plain PyTorch TopK SAE: dense encoder, topk, dense decoder, autograd, Adam at a
                    constant lr on unit-mean-square inputs (what a first implementation looks like).
                    The same code makes the dense reference of the other kinds: a transcoder (step(x, y):
                    FVU of y, input centred by a fixed b_in; `skip` adds x·W_skipᵀ), a crosscoder (`n_layers`
                    hook points side by side, one dense decoder to all of them, mean per-layer FVU) and a
                    Matryoshka BatchTopK SAE (`groups`: the batch's top B·k, one partial dense decode per
                    group summed into every prefix, mean prefix FVU).

Both expose `step(x_raw)` and `encoder_decoder()` → (encode, W_dec, b_dec) in raw units for evaluation.
`round_robin` is the side-by-side timing the benches share.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

# (raw rows -> dense latents, W_dec [d_sae, d_in], b_dec): x̂ = latents @ W_dec + b_dec in raw units
EncDec = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor]


def sparsify_available() -> bool:
    try:
        import schedulefree  # noqa: F401
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


class SparsifyDefaults:
    name = "sparsify"

    def __init__(self, d: int, n: int, k: int, seed: int = 0, device: str = "cpu"):
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD
        torch.manual_seed(seed)
        self.sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device, dtype=torch.float32)
        self.lr = 5e-3 / (n / 2**14) ** 0.5  # sparsify.trainer, case "signum"
        self.opt = ScheduleFreeWrapper(SignSGD([dict(params=self.sc.parameters(), lr=self.lr)]), momentum=0.95)
        self.opt.train()
        self.first = True

    def step(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, auxk_alpha: float = 1 / 32) -> None:
        """One step of sparsify.trainer's loop; `dead_mask` only to time its AuxK path (off by default)."""
        sc = self.sc
        if self.first:  # sparsify.trainer: on the first step b_dec = mean of the batch
            sc.b_dec.data = x.mean(0)
            self.first = False
        sc.set_decoder_norm_to_unit_norm()
        out = sc(x, dead_mask=dead_mask)  # auxk_alpha defaults to 0: no dead mask, no AuxK
        (out.fvu + auxk_alpha * out.auxk_loss if dead_mask is not None else out.fvu).backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()

    def encoder_decoder(self) -> EncDec:
        """Evaluation as sparsify does it: optimizer.eval() puts the averaged weights in place."""
        import copy
        self.opt.eval()
        sc = copy.deepcopy(self.sc)
        self.opt.train()

        def enc(x: torch.Tensor) -> torch.Tensor:
            acts, idx, _ = sc.encode(x)
            return torch.zeros(x.shape[0], sc.num_latents, device=x.device).scatter_(1, idx, acts)

        return enc, sc.W_dec.detach(), sc.b_dec.detach()


class DenseAdam:
    name = "dense-adam"

    def __init__(self, d: int, n: int, k: int, b_dec: torch.Tensor, scale: float, lr: float, seed: int = 0,
                 n_layers: int = 1, b_in: torch.Tensor | None = None, skip: bool = False,
                 groups: list[int] | None = None):
        """d: the input width (L·d_layer for a crosscoder); b_in: a transcoder's fixed input centre
        (its target has the input's width); groups: Matryoshka group sizes (BatchTopK selection)."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, d, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.k, self.scale, self.n_layers, self.groups = k, scale, n_layers, groups
        self.b_in = None if b_in is None else b_in.clone()
        params = [self.W_dec, self.W_enc, self.b_enc, self.b_dec]
        self.W_skip = torch.nn.Parameter(torch.zeros(d, d)) if skip else None
        if self.W_skip is not None:
            params.append(self.W_skip)
        self.opt = torch.optim.Adam(params, lr=lr)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu((x - (self.b_dec if self.b_in is None else self.b_in)) @ self.W_enc + self.b_enc)
        if self.groups:  # BatchTopK: the top B·k activations of the whole batch
            v, i = pre.flatten().topk(self.k * pre.shape[0], sorted=False)
            return torch.zeros_like(pre).flatten().scatter(0, i, v).view_as(pre)
        v, i = pre.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter(1, i, v)

    def _fvu(self, recon: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over layers of each layer's FVU (one layer: the FVU)."""
        b, L = y.shape[0], self.n_layers
        err = (recon - y).pow(2).view(b, L, -1).sum((0, 2))
        return (err / (y - y.mean(0)).pow(2).view(b, L, -1).sum((0, 2))).mean()

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of raw inputs x (and a transcoder's targets y): FVU, per-layer mean, prefix mean."""
        x = x * self.scale
        y = x if y is None else y * self.scale
        f = self._encode(x)
        out = self.b_dec if self.W_skip is None else self.b_dec + x @ self.W_skip.t()
        if self.groups:  # every nested prefix reconstructs y
            losses, start = [], 0
            for size in self.groups:
                out = out + f[:, start:start + size] @ self.W_dec[start:start + size]
                losses.append(self._fvu(out, y))
                start += size
            return torch.stack(losses).mean()
        return self._fvu(f @ self.W_dec + out, y)

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        self.loss(x, y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def encoder_decoder(self) -> EncDec:
        s = self.scale

        def enc(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self._encode(x * s)

        return enc, self.W_dec.detach() / s, self.b_dec.detach() / s


def dense_adam_lr(d_sae: int) -> float:
    """The constant Adam lr of the plain reference: saeforge's adam rule."""
    return 6e-4 / math.sqrt(d_sae / 16384)


def round_robin(fns: Mapping[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns (so background load hits all alike)
    after one warm-up call each (allocations, optimizer state)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}
