"""The evaluation report: Markdown with PNG plots (matplotlib), beside eval.json.

    SAE_DIR/eval_report.md
    SAE_DIR/eval_plots/probing_vs_k.png         accuracy of the top-k latent probes vs k, raw probe dashed
    SAE_DIR/eval_plots/absorption_letters.png   full-absorption rate and absorption fraction per letter
    SAE_DIR/eval_plots/latent_density.png       histogram of log10 latent firing densities

Every figure is written `value ± half-width` of its bootstrap 95% interval. Paths may be URLs
(PNG bytes go through the same path layer as eval.json).
"""
from __future__ import annotations

import io
from typing import Any

from saeforge.urls import join, makedirs, write_bytes, write_text
from sae.bootstrap import CI_SUFFIX

PLOTS = "eval_plots"
REPORT = "eval_report.md"


def pm(d: dict[str, Any], key: str, digits: int = 4) -> str:
    """`value ± half-width` (or the bare value when there is no interval; 'n/a' when absent)."""
    v = d.get(key)
    if v is None or isinstance(v, (list, dict, str, bool)):
        return "n/a" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    ci = d.get(key + CI_SUFFIX)
    if not ci:
        return f"{v:.{digits}g}"
    half = (ci[1] - ci[0]) / 2
    return f"{v:.{digits}g} ± {half:.2g}"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _err(d: dict[str, Any], key: str) -> tuple[float, float]:
    """(below, above) error-bar lengths of d[key] from its interval."""
    ci, v = d.get(key + CI_SUFFIX), d.get(key)
    if not ci or v is None:
        return 0.0, 0.0
    return max(v - ci[0], 0.0), max(ci[1] - v, 0.0)


def probing_plot(probing: dict[str, Any], ks: list[int]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tasks = {n: r for n, r in probing["tasks"].items() if "raw_acc" in r}
    for i, (name, r) in enumerate(tasks.items()):
        color = f"C{i % 10}"
        y = [r[f"top{k}_acc"] for k in ks]
        err = list(zip(*[_err(r, f"top{k}_acc") for k in ks]))
        ax.errorbar(ks, y, yerr=err, marker="o", capsize=3, color=color, label=name)
        ax.axhline(r["raw_acc"], color=color, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (SAE latents in the probe)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("sparse probing (dashed: probe on all raw activations)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def absorption_plot(ab: dict[str, Any]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    letters = list(ab["letters"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = range(len(letters))
    for off, key, label in ((-0.2, "full_absorption_rate", "full absorption rate"),
                            (0.2, "absorption_fraction", "absorption fraction")):
        vals = [ab["letters"][c][key] for c in letters]
        err = list(zip(*[_err(ab["letters"][c], key) for c in letters]))
        ax.bar([i + off for i in x], vals, width=0.4, yerr=err, capsize=2, label=label)
    ax.set_xticks(list(x), letters)
    ax.set_xlabel("first letter")
    ax.set_ylabel("rate over probe true positives")
    ax.set_title("feature absorption per letter (95% bootstrap intervals)")
    ax.legend(fontsize=8)
    return _png(fig)


def density_plot(hist: dict[str, Any]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = hist["log10_edges"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(e[:-1], hist["counts"], width=[b - a for a, b in zip(e, e[1:])], align="edge", edgecolor="black")
    ax.set_xlabel("log10(latent firing density)")
    ax.set_ylabel("latents")
    ax.set_title(f"latent density ({hist['dead']:,} dead latents not shown)")
    return _png(fig)


SECTIONS = [
    ("Reconstruction (held-out keep rows)", ["fvu", "explained_variance", "mse", "cossim", "l2_ratio",
                                             "with_outliers_fvu", "all_rows_fvu", "n_rows", "n_sequences"]),
    ("Sparsity", ["l0", "dead_fraction", "dense_fraction"]),
    ("Downstream (SAE spliced into the model)", ["ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_score",
                                                  "kl_div_sae", "kl_div_score", "ce_sequences"]),
]


def write_report(result: dict[str, Any], sae_dir: str) -> str:
    """Write the Markdown report and its plots beside eval.json; returns the report's path."""
    m = result["metrics"]
    lines = [f"# Evaluation of `{result['sae_dir']}`", "",
             f"Model `{result['model']}`, hook `{m.get('hook_point')}`, store `{m.get('store')}`, split "
             f"`{m.get('split')}`. Figures are `value ± half-width` of a bootstrap 95% interval over held-out "
             f"sequences (probing: test windows; absorption: test words), {result['config'].get('bootstrap')} "
             f"resamples, seed {result['config'].get('seed')}.", ""]
    for title, keys in SECTIONS:
        rows = [(k, pm(m, k)) for k in keys if k in m]
        if rows:
            lines += [f"## {title}", "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    plots = join(sae_dir, PLOTS)
    makedirs(plots)
    if m.get("latent_density_hist"):
        write_bytes(join(plots, "latent_density.png"), density_plot(m["latent_density_hist"]))
        lines += [f"![latent density]({PLOTS}/latent_density.png)", ""]
    probing = result.get("probing")
    if probing and probing.get("tasks"):
        ks = result["config"]["probe_ks"]
        lines += ["## Sparse probing (held-out accuracy)", "",
                  "| task | level | raw activations | " + " | ".join(f"top-{k} latents" for k in ks) + " |",
                  "|---|---|---|" + "---|" * len(ks)]
        for name, r in probing["tasks"].items():
            if "raw_acc" not in r:
                lines.append(f"| {name} | {r.get('level')} | {r.get('error', 'n/a')} |" + " |" * len(ks))
                continue
            lines.append(f"| {name} | {r['level']} | {pm(r, 'raw_acc')} | "
                         + " | ".join(pm(r, f"top{k}_acc") for k in ks) + " |")
        mean = probing.get("mean", {})
        if "raw_acc" in mean:
            lines.append(f"| **mean** | | {pm(mean, 'raw_acc')} | " + " | ".join(pm(mean, f"top{k}_acc") for k in ks) + " |")
        write_bytes(join(plots, "probing_vs_k.png"), probing_plot(probing, ks))
        lines += ["", f"![probing accuracy vs k]({PLOTS}/probing_vs_k.png)", ""]
    ab = result.get("absorption")
    if ab and ab.get("letters"):
        lines += ["## Feature absorption (first letter)", "",
                  f"Mean over {len(ab['letters'])} letters: full-absorption rate {pm(ab, 'full_absorption_rate')}, "
                  f"absorption fraction {pm(ab, 'absorption_fraction')}, main latents per letter "
                  f"{ab.get('mean_main_latents', 0):.2f}; {ab['n_train_words']:,} train / {ab['n_test_words']:,} "
                  f"test words.", "", "| letter | full absorption | absorption fraction | true positives | main latents |",
                  "|---|---|---|---|---|"]
        for c, r in ab["letters"].items():
            lines.append(f"| {c} | {pm(r, 'full_absorption_rate')} | {pm(r, 'absorption_fraction')} | "
                         f"{r['n_true_positives']} | {r['main_latents']} |")
        if ab.get("skipped_letters"):
            lines += ["", "Not evaluated: " + ", ".join(f"{c} ({why})" for c, why in ab["skipped_letters"].items())]
        write_bytes(join(plots, "absorption_letters.png"), absorption_plot(ab))
        lines += ["", f"![absorption per letter]({PLOTS}/absorption_letters.png)", ""]
    t = result.get("timings")
    if t:
        lines += ["## Time per part (s)", "", "| part | seconds |", "|---|---|",
                  *(f"| {k} | {v:.1f} |" for k, v in t.items()), ""]
    path = join(sae_dir, REPORT)
    write_text(path, "\n".join(lines) + "\n")
    return path
