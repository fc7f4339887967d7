"""`saeforge lens`: logit lens over every layer for one prompt → terminal table, CSV, JSON, PNG heatmap."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analysis.lens import LensResult, encode_prompt, logit_lens
from analysis.plots import heatmap, short_label, write_csv
from saeforge.config import option, parse_config, save_config
from saeforge.devices import check_device
from saeforge.errors import UserError
from saeforge.urls import check_output_dir, write_json
from collect.model import ModelDtype, load_model

log = logging.getLogger(__name__)


@dataclass
class LensConfig:
    model: str = option("smollm2-135m", "model spec (alias, HF dir, .gguf, hub name)")
    prompt: str | None = option(None, "the text to read through the lens")
    target: str | None = option(None, "one token to track, e.g. ' Paris' (leading space)")
    out: str = option("runs/lens", "output directory")
    top: int = option(5, "top tokens per layer and position")
    position: int = option(-1, "position shown in the per-layer table (-1 = last)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: ModelDtype = option("float32", "model compute dtype")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if not self.prompt:
            raise UserError("--prompt is required, e.g. --prompt \"The capital of France is\"")
        if self.top < 1:
            raise UserError(f"--top {self.top} must be at least 1")
        check_output_dir(self.out)
        check_device(self.device)


def format_table(res: LensResult, position: int) -> str:
    """Per-layer table at one position (top tokens, target prob and rank), then the top-1 grid."""
    p = position % res.n_positions
    lines = [f"logit lens at position {p} {res.tokens[p]!r} (predicting the next token)"]
    has_t = res.target_probs is not None
    head = f"{'layer':>5}  " + (f"{'p(target)':>10} {'rank':>6}  " if has_t else "") + "top tokens"
    lines.append(head)
    for li in range(res.n_layers):
        tops = "  ".join(f"{tok!r} {float(pr):.3f}" for tok, pr in zip(res.top_tokens[li][p], res.top_probs[li, p]))
        t = (f"{float(res.target_probs[li, p]):>10.3g} {int(res.target_ranks[li, p]):>6}  "  # type: ignore[index]
             if has_t else "")
        lines.append(f"{li:>5}  {t}{tops}")
    w = 9
    lines.append("")
    lines.append("top-1 token per layer (rows) and position (columns)")
    lines.append(f"{'':>5}  " + " ".join(f"{short_label(repr(tok), w):<{w}}" for tok in res.tokens))
    for li in range(res.n_layers):
        lines.append(f"{li:>5}  " + " ".join(f"{short_label(repr(res.top_tokens[li][q][0]), w):<{w}}"
                                              for q in range(res.n_positions)))
    return "\n".join(lines)


def write_outputs(res: LensResult, out: Path, cfg: LensConfig | None = None) -> dict[str, Path]:
    """lens.csv (one row per layer × position), lens.json, lens.png, config.json."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "lens.csv", "json": out / "lens.json", "png": out / "lens.png"}
    write_csv(res.rows(), paths["csv"])
    write_json(paths["json"], res.to_json())
    cols = [f"{i}:{t}" for i, t in enumerate(res.tokens)]
    top1 = [[res.top_tokens[li][p][0] for p in range(res.n_positions)] for li in range(res.n_layers)]
    if res.target_probs is not None:
        heatmap(res.target_probs, paths["png"], row_labels=[str(i) for i in range(res.n_layers)], col_labels=cols,
                title=f"logit lens: p({res.target!r}) after each layer (text: top-1 token)",
                cbar_label=f"p({res.target!r})", vmin=0.0, vmax=1.0, annotations=top1)
    else:
        heatmap(res.top_probs[..., 0], paths["png"], row_labels=[str(i) for i in range(res.n_layers)],
                col_labels=cols, title="logit lens: top-1 token after each layer", cbar_label="p(top-1)",
                vmin=0.0, vmax=1.0, annotations=top1)
    if cfg is not None:
        paths["config"] = Path(save_config(cfg, out))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(LensConfig, argv, section="lens", prog="saeforge lens",
                          description="Logit lens: the next-token distribution after every layer.")
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    n_pos = encode_prompt(lm.tokenizer, cfg.prompt).shape[1]  # type: ignore[arg-type]
    if not -n_pos <= cfg.position < n_pos:
        raise UserError(f"--position {cfg.position} is out of range: the prompt has {n_pos} tokens "
                        f"(use 0..{n_pos - 1} or -1 for the last)")
    res = logit_lens(lm.model, lm.tokenizer, cfg.prompt, target=cfg.target, top=cfg.top)  # type: ignore[arg-type]
    paths = write_outputs(res, Path(cfg.out), cfg)
    print(format_table(res, cfg.position))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
