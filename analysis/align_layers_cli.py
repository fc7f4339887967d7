"""`saeforge align-layers --model smollm2-135m --features 576 --top 10 --vocab 8192 --out runs/align-layers`

Seed 004's alignment study: the top inputs of features 0..F−1 at every layer (complete search over
single tokens, or greedy strings), their layers × layers overlap, and the same on a random-initialised
copy of the model (same config, fixed seed) as the control. With `--model-b`, model A's layers against
model B's (same tokenizer). Writes overlap.png (both panels), overlap_model.png, overlap_control.png, overlap.csv, tops.json and
summary.json to --out and prints a one-line summary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from saeforge.config import config_dict, option, parse_config
from saeforge.devices import check_device
from saeforge.errors import UserError

Site = Literal["resid_post", "resid_pre", "attn_out", "mlp_out", "mlp_hidden"]


@dataclass
class AlignLayersConfig:
    model: str = option("smollm2-135m", "model spec (A)")
    model_b: str | None = option(None, "a second model with the same tokenizer: overlap of A's layer i with B's layer j")
    site: Site = option("resid_post", "what a feature is: neuron f of layers.{i}.SITE (mlp_hidden = MLP neuron f)")
    layers: list[int] = option([], "layers studied (none given: all)")
    saes: list[str] = option([], "per-layer SAE directories (their latents instead of neurons), in layer order")
    saes_b: list[str] = option([], "per-layer SAE directories for --model-b")
    sae_match: Literal["index", "decoder"] = option(
        "index", "SAE latents compared by index, or latent f of the first SAE with its decoder-cosine partners")
    features: int = option(64, "features 0..F-1 at every layer")
    method: Literal["complete", "greedy"] = option("complete", "top inputs by complete search (single tokens) or greedy strings")
    top: int = option(10, "top single tokens per feature (complete search)")
    greedy_tokens: int = option(3, "length of the greedy strings (greedy search)")
    vocab: int | None = option(None, "search token ids below this only (none: the whole vocabulary)")
    bos: bool = option(True, "start every input with BOS")
    control: bool = option(True, "also run the random-init control")
    seed: int = option(0, "seed of the random-init control (model B's control uses seed+1)")
    batch: int = option(512, "vocabulary tokens per forward")
    out: str = option("runs/align-layers", "output directory")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    threads: int = option(0, "torch CPU threads (0: torch's default; 1 is fastest on a busy machine)")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        check_device(self.device)
        if self.features < 1 or self.top < 1 or self.batch < 1 or self.greedy_tokens < 1:
            raise UserError("--features, --top, --greedy-tokens and --batch must be at least 1")
        if self.saes_b and not self.model_b:
            raise UserError("--saes-b needs --model-b")
        if self.model_b and bool(self.saes) != bool(self.saes_b):
            raise UserError("with --model-b, give SAEs for both models (--saes and --saes-b) or for neither")
        p = Path(self.out)
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {self.out!r} is a file; pass a directory")


def _units(lm, cfg: AlignLayersConfig, sae_dirs: list[str]):
    from analysis.align_layers import neuron_units, sae_units
    if not sae_dirs:
        return neuron_units(lm.model, cfg.site, cfg.features, cfg.layers or None)
    from sae.io import load_sae, sae_summary
    loaded = []
    for d in sae_dirs:
        meta = sae_summary(d)
        if not meta["hook_point"]:
            raise UserError(f"SAE {d!r} records no hook point; pass SAE directories written by `saeforge train`")
        if meta.get("model_hash") and meta["model_hash"] != lm.weights_hash:
            raise UserError(f"SAE {d!r} was trained on model {meta.get('model')!r} (hash {meta['model_hash'][:12]}), "
                            f"not on {lm.spec!r} (hash {lm.weights_hash[:12]}); pass the SAEs of this model")
        loaded.append((f"{meta['hook_point']} ({Path(d).name})", load_sae(d, cfg.device), meta["hook_point"]))
    return sae_units(lm.model, loaded, cfg.features, cfg.sae_match)


def _check_same_tokenizer(a, b) -> None:
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise UserError(f"models {a.spec!r} and {b.spec!r} have different tokenizers ({len(va)} vs {len(vb)} "
                        f"tokens, {diff} entries differ); the overlap of top inputs needs one vocabulary")


def _control(lm, seed: int):
    from analysis.align_layers import random_init_copy
    from collect.model import LoadedModel, weights_hash
    ctrl = random_init_copy(lm.model, seed)
    h = weights_hash(ctrl)
    if h == lm.weights_hash:
        raise UserError(f"the random-init control with --seed {seed} has the very weights of {lm.spec!r} "
                        f"(it is itself a seeded random init); pass another --seed")
    return LoadedModel(ctrl, lm.tokenizer, f"random init of {lm.spec} (seed {seed})", h)


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.align_layers import study
    from analysis.align_layers_plot import overlap_figure
    from analysis.plots import write_csv
    from collect.model import load_model
    from saeforge.urls import write_json

    cfg, _ = parse_config(AlignLayersConfig, argv, section="align-layers", prog="saeforge align-layers",
                          description="Overlap of the top inputs of features 0..F-1 between layers (seed 004), "
                                      "with a random-init control.")
    if cfg.threads > 0:
        import torch
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    a = load_model(cfg.model, cfg.device)
    b = load_model(cfg.model_b, cfg.device) if cfg.model_b else None
    if b is not None:
        _check_same_tokenizer(a, b)
    units_a = _units(a, cfg, cfg.saes)
    units_b = _units(b, cfg, cfg.saes_b) if b is not None else None
    tok: Any = a.tokenizer
    prefix = [tok.bos_token_id] if cfg.bos and tok.bos_token_id is not None else []
    kw: dict[str, Any] = dict(method=cfg.method, top=cfg.top, greedy_tokens=cfg.greedy_tokens, vocab=cfg.vocab, batch=cfg.batch,
              quiet=cfg.quiet)
    res = {"model": study(a.model, units_a, prefix, model_b=b.model if b else None, units_b=units_b,
                          desc="model", **kw)}  # type: ignore[arg-type]
    if cfg.control:
        ca = _control(a, cfg.seed)
        cb = _control(b, cfg.seed + 1) if b is not None else None
        res["control"] = study(ca.model, units_a, prefix, model_b=cb.model if cb else None, units_b=units_b,
                               desc="control", **kw)  # type: ignore[arg-type]
    first = res["model"]
    what = "SAE latents" if cfg.saes else f"{'MLP neurons' if cfg.site == 'mlp_hidden' else 'neurons of ' + cfg.site}"
    inputs = f"top {cfg.top} single tokens" if cfg.method == "complete" else f"greedy {cfg.greedy_tokens}-token strings"
    title = f"{what} 0..{cfg.features - 1}, {inputs}"
    axes = dict(xlabel=f"layer of {cfg.model_b or cfg.model}", ylabel=f"layer of {cfg.model}")
    for name, s in res.items():
        overlap_figure([(name, s.overlap)], s.labels_a, s.labels_b, out / f"overlap_{name}.png", suptitle=title, **axes)
    overlap_figure([(name, s.overlap) for name, s in res.items()], first.labels_a, first.labels_b, out / "overlap.png",
                   suptitle=title, **axes)
    rows = []
    for i, la in enumerate(first.labels_a):
        for j, lb in enumerate(first.labels_b):
            row = {"unit_a": la, "unit_b": lb, "i": i, "j": j, "overlap_model": round(float(first.overlap[i, j]), 6)}
            if "control" in res:
                row["overlap_control"] = round(float(res["control"].overlap[i, j]), 6)
            rows.append(row)
    write_csv(rows, out / "overlap.csv")
    n_show = min(cfg.features, 8)

    def tops(s, which: str) -> dict:
        t = s.tops_a if which == "a" else s.tops_b
        labels = s.labels_a if which == "a" else s.labels_b
        return {lab: {"ids": t[u].tolist(),
                      "text": [[tok.decode([int(x)]) for x in t[u, f]] for f in range(n_show)]}
                for u, lab in enumerate(labels)}
    write_json(str(out / "tops.json"), {name: {"a": tops(s, "a"), **({"b": tops(s, "b")} if b else {})}
                                        for name, s in res.items()})
    kind = "matched-depth" if b is not None else "adjacent-layer"
    summary = {"kind": kind, "chance": first.chance, "seconds_total": time.perf_counter() - t0,
               **{f"{name}_mean_{kind}_overlap": s.summary for name, s in res.items()},
               **{f"{name}_mean_offdiagonal_overlap": _offdiag(s.overlap) for name, s in res.items()},
               **{f"{name}_seconds": s.seconds for name, s in res.items()},
               "config": config_dict(cfg)}
    write_json(str(out / "summary.json"), summary)
    line = f"mean {kind} overlap: model {first.summary:.3f}"
    if "control" in res:
        line += f" vs random-init control {res['control'].summary:.3f}"
    line += (f" (chance {first.chance:.4f}; {what} 0..{cfg.features - 1}, {inputs}, "
             f"{len(first.labels_a)}×{len(first.labels_b)} units; {time.perf_counter() - t0:.0f} s)")
    print(line)
    print(f"wrote {out}/overlap.png, overlap_model.png" + (", overlap_control.png" if "control" in res else "")
          + ", overlap.csv, tops.json, summary.json")
    return 0


def _offdiag(m) -> float:
    import torch
    if m.shape[0] != m.shape[1] or m.shape[0] < 2:
        return float(m.mean())
    mask = ~torch.eye(m.shape[0], dtype=torch.bool)
    return float(m[mask].mean())
