"""`saeforge eval A B C --compare`: several SAEs side by side, and recipes across seed replicas.

Every SAE's headline figures are shown `value ± half-width` (bootstrap 95% intervals over held-out
data). SAEs trained with the same recipe (cfg.json identical but for the seed and the output
folder, e.g. the members of `saeforge train --seed 0,1,2`) form one recipe, reported as the mean
± standard deviation across its seeds: the spread a reader must beat before calling two recipes
different.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from saeforge.urls import join, makedirs, write_json, write_text
from sae.bootstrap import mean_sd
from sae.config import RESUMABLE_CHANGES
from sae.eval_report import pm

HEADLINE = ["fvu", "explained_variance", "cossim", "l0", "dead_fraction", "ce_loss_score", "kl_div_sae",
            "probe_mean_raw_acc", "probe_mean_top1_acc", "probe_mean_top2_acc", "probe_mean_top5_acc",
            "probe_mean_top20_acc", "absorption_full_absorption_rate", "absorption_absorption_fraction"]
NOT_RECIPE = RESUMABLE_CHANGES | {"seed", "out", "arch", "k", "expansion", "lr"}  # the member's own arch/lr count


def recipe_key(sae_cfg: dict[str, Any]) -> str:
    """What defines an SAE's recipe: its architecture, learning rate and training settings, not its seed."""
    train = {k: v for k, v in (sae_cfg.get("config") or {}).items() if k not in NOT_RECIPE}
    return json.dumps({"arch": sae_cfg.get("arch_config"), "lr": sae_cfg.get("lr"), "hook": sae_cfg.get("hook_point"),
                       "train": train}, sort_keys=True, default=str)


def _name(sae_dir: str) -> str:
    return os.path.basename(str(sae_dir).rstrip("/")) or str(sae_dir)


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison of eval results (each with its SAE's cfg.json read from `sae_dir`)."""
    from sae.io import read_cfg
    keys = [k for k in HEADLINE if any(r["metrics"].get(k) is not None for r in results)]
    saes = []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        scfg = read_cfg(r["sae_dir"])
        seed = scfg.get("seed", (scfg.get("config") or {}).get("seed"))
        saes.append({"sae_dir": r["sae_dir"], "name": _name(r["sae_dir"]), "seed": seed,
                     "metrics": {k: r["metrics"].get(k) for k in keys} |
                     {k + "_ci95": r["metrics"].get(k + "_ci95") for k in keys}})
        groups.setdefault(recipe_key(scfg), []).append(i)
    recipes = []
    for members in groups.values():
        names = [saes[i]["name"] for i in members]
        base = re.sub(r"_s\d+$", "", names[0])
        entry: dict[str, Any] = {"name": base, "members": names, "seeds": [saes[i]["seed"] for i in members]}
        if len(members) > 1:
            entry["mean_sd"] = {}
            for k in keys:
                vals = [saes[i]["metrics"][k] for i in members if saes[i]["metrics"][k] is not None]
                if len(vals) == len(members):
                    entry["mean_sd"][k] = list(mean_sd(vals))
        recipes.append(entry)
    return {"figures": keys, "saes": saes, "recipes": recipes}


def format_compare(cmp: dict[str, Any]) -> str:
    """A plain-text table: one column per SAE, then one per multi-seed recipe (mean ± sd)."""
    multi = [r for r in cmp["recipes"] if "mean_sd" in r]
    heads = [s["name"] for s in cmp["saes"]] + [f"{r['name']} (mean ± sd, {len(r['members'])} seeds)" for r in multi]
    width = max(22, *(len(h) for h in heads))
    lines = [f"{'figure':<34}" + "".join(f" {h:>{width}}" for h in heads)]
    for k in cmp["figures"]:
        cells = [pm(s["metrics"], k) for s in cmp["saes"]]
        for r in multi:
            ms = r["mean_sd"].get(k)
            cells.append("n/a" if ms is None else f"{ms[0]:.4g} ± {ms[1]:.2g}")
        lines.append(f"{k:<34}" + "".join(f" {c:>{width}}" for c in cells))
    return "\n".join(lines)


def write_compare(cmp: dict[str, Any], out_dir: str) -> str:
    """compare.json and compare.md in `out_dir`; returns the Markdown path."""
    makedirs(out_dir)
    write_json(join(out_dir, "compare.json"), cmp, indent=2)
    multi = [r for r in cmp["recipes"] if "mean_sd" in r]
    heads = [s["name"] for s in cmp["saes"]] + [f"{r['name']} mean ± sd ({len(r['members'])} seeds)" for r in multi]
    lines = ["# SAE comparison", "", "Per SAE: value ± half-width of the bootstrap 95% interval. Per recipe with "
             "several seeds: mean ± standard deviation across seeds.", "",
             "| figure | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for k in cmp["figures"]:
        cells = [pm(s["metrics"], k) for s in cmp["saes"]]
        cells += ["n/a" if r["mean_sd"].get(k) is None else f"{r['mean_sd'][k][0]:.4g} ± {r['mean_sd'][k][1]:.2g}"
                  for r in multi]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {s['name']}: `{s['sae_dir']}` (seed {s['seed']})" for s in cmp["saes"])]
    path = join(out_dir, "compare.md")
    write_text(path, "\n".join(lines) + "\n")
    return path
