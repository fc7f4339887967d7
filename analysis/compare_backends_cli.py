"""`saeforge compare-backends`: a GGUF model's layer outputs in llama.cpp next to saeforge's PyTorch
model's, per hook point and position → terminal table, CSV, JSON and a PNG heatmap of the cosine.

    saeforge compare-backends --model smollm2-135m --prompt "The capital of France is" --out runs/compare
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from saeforge.config import parse_config, save_config
from saeforge.errors import UserError


@dataclass
class CompareConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "a GGUF model: the alias, a .gguf path or a folder "
                                                                 "holding one (PyTorch de-quantises it)"})
    prompt: str = field(default="The capital of France is", metadata={"help": "the prompt to run on both sides"})
    prompts_file: str | None = field(default=None, metadata={"help": "more prompts, one per line"})
    hooks: str = field(default="all", metadata={"help": "comma-separated hook points, or 'all' = every "
                                                        "layers.N.resid_post"})
    bos: bool = field(default=False, metadata={"help": "prepend BOS on both sides (the first position is then an "
                                                       "attention sink)"})
    out: str = field(default="runs/compare-backends", metadata={"help": "output directory (CSV, JSON, PNG)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (for both backends)"})
    quiet: bool = False

    def prompts(self) -> list[str]:
        out = [self.prompt] if self.prompt.strip() else []
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise UserError(f"--prompts-file {self.prompts_file!r} not found; pass a text file, one prompt a line")
            out += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not out:
            raise UserError("no prompts: pass --prompt TEXT or --prompts-file FILE")
        return out


def format_table(summary: dict) -> str:
    lines = [f"{'hook point':<22} {'cos min':>9} {'cos mean':>9} {'rel.err mean':>12} {'rel.err max':>11}"]
    for p, s in summary["points"].items():
        lines.append(f"{p:<22} {s['cosine_min']:>9.5f} {s['cosine_mean']:>9.5f} {s['rel_error_mean']:>12.4f} "
                     f"{s['rel_error_max']:>11.4f}")
    lines.append(f"next-token top-1 agrees at {summary['top1_agree']} of {summary['positions']} positions; "
                 f"llama.cpp's tokenizer gives the same ids: {summary['same_tokenization']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(CompareConfig, argv, section="compare-backends", prog="saeforge compare-backends",
                          description="llama.cpp's layer outputs vs saeforge's PyTorch model on the same tokens")
    import numpy as np
    import torch

    from analysis import compare_backends as C
    from analysis.plots import heatmap, write_csv
    from analysis.steer_llamacpp import open_model
    from collect.model import load_model

    prompts = cfg.prompts()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {cfg.out!r} is a file; pass a directory")
    lcm = open_model(cfg.model, cfg.device)           # first: a missing binding or bad GGUF fails fast
    lm = load_model(cfg.model, cfg.device)
    points = C.all_resid_post(lcm.n_layer) if cfg.hooks.strip() == "all" else \
        [h.strip() for h in cfg.hooks.split(",") if h.strip()]
    comps = [C.compare_prompt(lm, lcm, p, points, bos=cfg.bos) for p in prompts]
    summary = C.summary(comps)
    summary.update({"model": cfg.model, "gguf": lcm.path, "arch": lcm.arch, "quantization": lcm.quantization,
                    "torch_dtype": str(next(lm.model.parameters()).dtype)})
    out.mkdir(parents=True, exist_ok=True)
    write_csv(C.rows(comps), out / "compare.csv")
    (out / "compare.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    cos = np.concatenate([c.cosine for c in comps], axis=1)
    labels = [f"{k}:{piece}" if len(comps) > 1 else piece for k, c in enumerate(comps) for piece in c.pieces]
    heatmap(torch.from_numpy(cos), out / "cosine.png", row_labels=comps[0].points, col_labels=labels,
            title=f"cosine llama.cpp ({lcm.quantization}) vs PyTorch (float32), {Path(lcm.path).name}",
            cbar_label="cosine", cmap="viridis", ylabel="hook point")
    save_config(cfg, out)
    print(f"{cfg.model}: llama.cpp {lcm.arch} {lcm.quantization} vs PyTorch {summary['torch_dtype']}, "
          f"{len(prompts)} prompt(s), {summary['positions']} positions")
    print(format_table(summary))
    print(f"wrote {out / 'compare.csv'}, {out / 'compare.json'} and {out / 'cosine.png'}")
    return 0
