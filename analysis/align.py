"""Match the latents of two SAEs by decoder cosine similarity (seed 004: feature alignment).

    res = align(W_dec_a, W_dec_b, threshold=0.7)
    res.best_b[i], res.best_cos[i]   # nearest latent of B for every latent of A and its cosine
    res.share                         # share of A's latents with a partner above the threshold
    res.match_b                       # one-to-one matching (Hungarian with scipy if small, else greedy)

The cosine matrix is computed in blocks of rows, so two 16k-latent SAEs never need a 16k×16k
matrix in memory for the best-match part.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from saeforge.errors import UserError


@dataclass
class Alignment:
    best_b: torch.Tensor  # [n_a] index of the most similar latent of B
    best_cos: torch.Tensor  # [n_a]
    best_a: torch.Tensor  # [n_b] index of the most similar latent of A
    best_cos_b: torch.Tensor  # [n_b]
    match_b: torch.Tensor  # [n_a] one-to-one partner in B (−1 if none)
    match_cos: torch.Tensor  # [n_a]
    threshold: float
    method: str

    @property
    def share(self) -> float:
        """Share of A's latents whose best match in B has cosine ≥ threshold."""
        return float((self.best_cos >= self.threshold).float().mean())

    @property
    def share_b(self) -> float:
        return float((self.best_cos_b >= self.threshold).float().mean())

    @property
    def mutual(self) -> float:
        """Share of A's latents that are each other's nearest neighbour with B's, above threshold."""
        i = torch.arange(self.best_b.numel())
        return float(((self.best_a[self.best_b] == i) & (self.best_cos >= self.threshold)).float().mean())

    @property
    def share_one_to_one(self) -> float:
        return float((self.match_cos >= self.threshold).float().mean())


def _unit(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def align(W_a: torch.Tensor, W_b: torch.Tensor, threshold: float = 0.7, block: int = 2048,
          one_to_one: str = "auto", candidates: int = 8) -> Alignment:
    """Best matches both ways and a one-to-one matching of decoder rows W_a [n_a, d], W_b [n_b, d]."""
    if W_a.shape[1] != W_b.shape[1]:
        raise UserError(f"the SAEs have different input widths ({W_a.shape[1]} vs {W_b.shape[1]}); "
                        f"only SAEs on the same model width can be aligned")
    a, b = _unit(W_a), _unit(W_b)
    na, nb = a.shape[0], b.shape[0]
    best_b = torch.empty(na, dtype=torch.int64)
    best_cos = torch.empty(na)
    best_cos_b = torch.full((nb,), -2.0)
    best_a = torch.zeros(nb, dtype=torch.int64)
    m = min(candidates, nb)
    cand_cos = torch.empty(na, m)
    cand_idx = torch.empty(na, m, dtype=torch.int64)
    for s in range(0, na, block):
        c = a[s:s + block] @ b.t()
        v, i = c.topk(m, dim=1)
        cand_cos[s:s + block], cand_idx[s:s + block] = v, i
        best_cos[s:s + block], best_b[s:s + block] = v[:, 0], i[:, 0]
        cv, ci = c.max(0)
        upd = cv > best_cos_b
        best_cos_b[upd] = cv[upd]
        best_a[upd] = ci[upd] + s
    method = one_to_one
    if one_to_one == "auto":
        try:
            import scipy.optimize  # noqa: F401
            method = "hungarian" if na * nb <= 4096 * 4096 else "greedy"
        except ImportError:
            method = "greedy"
    match_b = torch.full((na,), -1, dtype=torch.int64)
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment
        rows, cols = linear_sum_assignment((a @ b.t()).numpy(), maximize=True)
        match_b[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    elif method == "greedy":
        # pairs among each A latent's top candidates, highest cosine first; each latent used once
        order = torch.argsort(cand_cos.reshape(-1), descending=True)
        used_b = torch.zeros(nb, dtype=torch.bool)
        ra = (order // m).tolist()
        rb = cand_idx.reshape(-1)[order].tolist()
        for i, j in zip(ra, rb):
            if match_b[i] < 0 and not used_b[j]:
                match_b[i] = j
                used_b[j] = True
    else:
        raise UserError(f"--one-to-one {one_to_one!r}: use auto, hungarian or greedy")
    has = match_b >= 0
    match_cos = torch.full((na,), float("nan"))
    match_cos[has] = (a[has] * b[match_b[has]]).sum(1)
    return Alignment(best_b, best_cos, best_a, best_cos_b, match_b, match_cos.nan_to_num(-1.0), threshold, method)
