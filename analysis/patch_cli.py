"""`saeforge patch`: activation patching clean → corrupted at every (layer, position) → table, CSV, PNG."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analysis.patching import METRICS, SITES, PatchResult, activation_patching
from analysis.plots import heatmap, short_label, write_csv
from saeforge.config import option, parse_config, save_config
from saeforge.devices import check_device
from saeforge.errors import UserError
from saeforge.urls import check_output_dir, write_json
from collect.model import ModelDtype, load_model


@dataclass
class PatchConfig:
    model: str = option("smollm2-135m", "model spec (alias, HF dir, .gguf, hub name)")
    clean: str | None = option(None, "the clean prompt")
    corrupt: str | None = option(None, "the corrupted prompt (same token length)")
    answer: str | None = option(None, "the clean answer, one token, e.g. ' Paris'")
    wrong: str | None = option(None, "the corrupted answer, one token, e.g. ' Rome'")
    hook: str = option("resid_post", "site to patch", choices=SITES)
    metric: str = option("logit_diff", "logit_diff (answer - wrong) or prob (of answer)", choices=METRICS)
    layers: list[int] | None = option(None, "layers to patch, e.g. 0,10,-1 (write --layers=-1,-2 when the list starts "
                                            "negative; default all)")
    batch_size: int = option(64, "patched copies per forward")
    out: str = option("runs/patch", "output directory")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: ModelDtype = option("float32", "model compute dtype")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        for name in ("clean", "corrupt", "answer", "wrong"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required; e.g. --clean \"The Eiffel Tower is in the city of\" "
                                "--corrupt \"The Colosseum is in the city of\" --answer \" Paris\" --wrong \" Rome\"")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        check_output_dir(self.out)
        check_device(self.device)


def _col_labels(res: PatchResult) -> list[str]:
    return [f"{p}:{c}" if c == k else f"{p}:{c}/{k}"
            for p, (c, k) in enumerate(zip(res.clean_tokens, res.corrupt_tokens))]


def format_table(res: PatchResult) -> str:
    """Normalised scores, layers as rows and positions as columns (clean/corrupt token where they differ)."""
    w = 9
    lines = [f"{res.metric}: clean {res.clean_metric:.4f}, corrupted {res.corrupt_metric:.4f}; "
             f"score = recovered fraction (0 = corrupted, 1 = clean), site {res.site}",
             f"{'layer':>5}  " + " ".join(f"{short_label(c, w):>{w}}" for c in _col_labels(res))]
    for li, layer in enumerate(res.layers):
        lines.append(f"{layer:>5}  " + " ".join(f"{float(v):>{w}.3f}" for v in res.scores[li]))
    flat = int(res.scores.argmax())
    li, p = divmod(flat, res.scores.shape[1])
    lines.append(f"best cell: layer {res.layers[li]}, position {p} {res.clean_tokens[p]!r}: "
                 f"{float(res.scores[li, p]):.3f}")
    return "\n".join(lines)


def write_outputs(res: PatchResult, out: Path, cfg: PatchConfig | None = None) -> dict[str, Path]:
    """patch.csv (one row per layer × position), patch.json (summary + matrix), patch.png, config.json."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "patch.csv", "json": out / "patch.json", "png": out / "patch.png"}
    write_csv(res.rows(), paths["csv"])
    write_json(paths["json"], {**res.summary(), "scores": res.scores.tolist(), "raw": res.raw.tolist()})
    heatmap(res.scores, paths["png"], row_labels=[str(i) for i in res.layers], col_labels=_col_labels(res),
            title=f"activation patching ({res.site}, {res.metric}): {res.answer!r} vs {res.wrong!r}",
            cbar_label="recovered (0 = corrupted, 1 = clean)", cmap="RdBu", center=0.0,
            annotations=[[f"{float(v):.2f}" for v in row] for row in res.scores])
    if cfg is not None:
        paths["config"] = Path(save_config(cfg, out))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(PatchConfig, argv, section="patch", prog="saeforge patch",
                          description="Activation patching: how much of the clean answer each "
                                      "(layer, position) restores.")
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    res = activation_patching(lm.model, lm.tokenizer, cfg.clean, cfg.corrupt,  # type: ignore[arg-type]
                              cfg.answer, cfg.wrong,  # type: ignore[arg-type]
                              site=cfg.hook, metric=cfg.metric, layers=cfg.layers, batch_size=cfg.batch_size,
                              quiet=cfg.quiet)
    paths = write_outputs(res, Path(cfg.out), cfg)
    print(format_table(res))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
