"""Self-contained HTML dashboard from a features directory (no network, no CDN).

    DIR/index.html               sortable, filterable table of latents (label, density, max, mean)
    DIR/latents/NNNNN.html       one page per latent: stats, activation histogram (inline SVG),
                                 output logits, top examples and examples per activation quantile,
                                 tokens shaded by activation with the value in a tooltip and
                                 whitespace made visible (␣ ↵ ⇥)
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from analysis.features import LATENT_DIR, load_features, load_latent
from analysis.labels import show_ws
from saeforge.progress import progress

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px} .meta{color:#666;font-size:13px}
a{color:#0b57d0;text-decoration:none} a:hover{text-decoration:underline}
table{border-collapse:collapse} th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
#latents th{cursor:pointer;user-select:none;background:#f6f6f6;position:sticky;top:0}
#latents th[aria-sort=ascending]::after{content:" ▲"} #latents th[aria-sort=descending]::after{content:" ▼"}
.controls{margin:12px 0;display:flex;gap:16px;align-items:center}
input[type=search]{padding:4px 8px;width:320px}
.stats td{border:none;padding:1px 12px 1px 0}
.row{display:flex;gap:40px;flex-wrap:wrap;align-items:flex-start}
.ex{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;margin:3px 0;padding:3px 6px;
    background:#fafafa;border-radius:4px;white-space:pre-wrap;word-break:break-all}
.ex .v{color:#888;display:inline-block;width:62px}
.t{border-radius:2px} .t.max{outline:1.5px solid #c33;outline-offset:0}
.ws{color:#aaa} .logits td.tok{font-family:ui-monospace,Menlo,monospace}
.pos{background:rgba(30,120,255,var(--a))} .neg{background:rgba(230,50,50,var(--a))}
svg text{font:10px system-ui,sans-serif;fill:#555}
"""

INDEX_JS = """
(function(){
  var table = document.getElementById('latents');
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var heads = table.tHead.rows[0].cells;
  function sortBy(th){
    var key = th.dataset.key, num = th.dataset.type === 'num';
    var dir = th.getAttribute('aria-sort') === (num ? 'descending' : 'ascending') ? -1 : 1;
    if (num) dir = -dir;
    rows.sort(function(a, b){
      var x = a.dataset[key], y = b.dataset[key];
      if (num) { x = parseFloat(x); y = parseFloat(y); return (x - y) * dir || (a.dataset.index - b.dataset.index); }
      return x.localeCompare(y) * dir || (a.dataset.index - b.dataset.index);
    });
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute('aria-sort');
    th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
    var frag = document.createDocumentFragment();
    rows.forEach(function(r){ frag.appendChild(r); });
    body.appendChild(frag);
  }
  for (var i = 0; i < heads.length; i++)
    heads[i].addEventListener('click', function(ev){ sortBy(ev.currentTarget); });
  var q = document.getElementById('filter'), alive = document.getElementById('alive');
  var shown = document.getElementById('shown');
  function filter(){
    var s = q.value.toLowerCase(), n = 0;
    rows.forEach(function(r){
      var ok = (!s || r.dataset.label.toLowerCase().indexOf(s) >= 0 || r.dataset.index === s)
               && (!alive.checked || parseFloat(r.dataset.density) > 0);
      r.style.display = ok ? '' : 'none'; if (ok) n++;
    });
    shown.textContent = n;
  }
  q.addEventListener('input', filter); alive.addEventListener('change', filter); filter();
})();
"""


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def pct(v: float) -> str:
    return "0" if v == 0 else (f"{100 * v:.3g}%" if v >= 1e-5 else f"{100 * v:.1e}%")


def token_html(tok: str) -> str:
    """Escaped token text with whitespace markers (␣ ↵ ⇥) in a lighter colour."""
    out = []
    for c in tok:
        m = show_ws(c)
        out.append(f'<span class="ws">{m}</span>' + ("\n" if c == "\n" else "") if m != c else _e(c))
    return "".join(out)


def bars_svg(heights: list[float], centres: list[float], width: int = 420, height: int = 130, color: str = "#f08a24",
             xlabel: str = "", log_y: bool = False, title_fmt=None) -> str:
    """A bar chart as inline SVG; every bar has a <title> tooltip with its range and count."""
    if not heights:
        return '<p class="meta">no data</p>'
    pad_l, pad_b, pad_t = 34, 28, 6
    w, h = width - pad_l - 6, height - pad_b - pad_t
    vals = [math.log10(1 + x) if log_y else x for x in heights]
    top = max(vals) or 1.0
    bw = w / len(heights)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#999"/>')
    for j, (v, x) in enumerate(zip(vals, centres)):
        bh = h * v / top
        tip = title_fmt(j, heights[j], x) if title_fmt else f"{fmt(x)}: {heights[j]}"
        parts.append(f'<rect x="{pad_l + j * bw:.2f}" y="{pad_t + h - bh:.2f}" width="{max(bw - 1, 0.8):.2f}" '
                     f'height="{bh:.2f}" fill="{color}"><title>{_e(tip)}</title></rect>')
    parts.append(f'<text x="{pad_l}" y="{height - 14}">{_e(fmt(centres[0]))}</text>')
    parts.append(f'<text x="{pad_l + w}" y="{height - 14}" text-anchor="end">{_e(fmt(centres[-1]))}</text>')
    parts.append(f'<text x="{pad_l + w / 2}" y="{height - 2}" text-anchor="middle">{_e(xlabel)}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{_e(fmt(max(heights)))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def example_html(a: dict, scale: float) -> str:
    """One context: tokens shaded by the latent's activation, the value in each tooltip.

    Tokens where the latent is silent are plain text: most of a context window is, and a span
    with style and tooltip on each of them made pages ~4× larger."""
    spans = []
    for j, (tok, v) in enumerate(zip(a["tokens"], a["values"])):
        is_max = j == a["maxValueTokenIndex"]
        if v == 0 and not is_max:
            spans.append(token_html(tok))
            continue
        alpha = max(0.0, min(1.0, v / scale)) if scale > 0 else 0.0
        cls = "t max" if is_max else "t"
        style = f' style="background:rgba(255,140,0,{alpha:.2f})"' if alpha > 0 else ""
        spans.append(f'<span class="{cls}"{style} title="activation {v:.4g}">{token_html(tok)}</span>')
    return f'<div class="ex"><span class="v">{_e(fmt(a["maxValue"]))}</span>{"".join(spans)}</div>'


def logits_html(strs: list[str], vals: list[float], cls: str) -> str:
    if not strs:
        return ""
    top = max(abs(v) for v in vals) or 1.0
    rows = "".join(f'<tr><td class="tok {cls}" style="--a:{abs(v) / top * 0.55:.3f}">{token_html(s)}</td>'
                   f'<td class="n">{v:+.3f}</td></tr>' for s, v in zip(strs, vals))
    return f'<table class="logits">{rows}</table>'


def page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<link rel="icon" href="data:,"><style>{CSS}</style></head><body>{body}{js}</body></html>\n')


def latent_page(rec: dict, doc: dict, n_latents: int) -> str:
    i = rec["index"]
    sae = doc.get("sae", {})
    nav = ('<a href="../index.html">all latents</a>'
           + (f' · <a href="{i - 1:05d}.html">← {i - 1}</a>' if i > 0 else "")
           + (f' · <a href="{i + 1:05d}.html">{i + 1} →</a>' if i + 1 < n_latents else ""))
    stats = (f'<table class="stats"><tr><td>density</td><td class="n">{pct(rec["frac_nonzero"])}</td>'
             f'<td>({rec["count"]} of {doc.get("store", {}).get("rows_counted", "?")} tokens)</td></tr>'
             f'<tr><td>max activation</td><td class="n">{fmt(rec["maxActApprox"])}</td><td></td></tr>'
             f'<tr><td>mean (all tokens)</td><td class="n">{fmt(rec["mean_act"])}</td><td></td></tr>'
             f'<tr><td>mean when active</td><td class="n">{fmt(rec["mean_act_active"])}</td><td></td></tr></table>')
    bw = rec.get("freq_hist_bin_width", 0.0)
    hist = bars_svg(rec["freq_hist_data_bar_heights"], rec["freq_hist_data_bar_values"], xlabel="activation (non-zero)",
                    title_fmt=lambda j, c, x: f"{fmt(x - bw / 2)} – {fmt(x + bw / 2)}: {c} tokens")
    lhist = ""
    if rec.get("logits_hist_data_bar_heights"):
        lhist = bars_svg(rec["logits_hist_data_bar_heights"], rec["logits_hist_data_bar_values"], width=300,
                         color="#6d8fd6", xlabel="logit effect over the vocabulary")
    logits = (f'<div><h2>Positive logits</h2>{logits_html(rec.get("pos_str", []), rec.get("pos_values", []), "pos")}</div>'
              f'<div><h2>Negative logits</h2>{logits_html(rec.get("neg_str", []), rec.get("neg_values", []), "neg")}</div>'
              + (f"<div><h2>Logit distribution</h2>{lhist}</div>" if lhist else ""))
    scale = rec["maxActApprox"] or 1.0
    top = [a for a in rec["activations"] if a.get("kind", "top") == "top"]
    quant = [a for a in rec["activations"] if a.get("kind") == "quantile"]
    ex = "".join(example_html(a, scale) for a in top) or '<p class="meta">this latent never fired on these tokens</p>'
    qhtml = ""
    groups: dict[int, list[dict]] = {}
    for a in quant:
        groups.setdefault(a["quantile"], []).append(a)
    for q in sorted(groups, reverse=True):
        g = groups[q]
        nq = g[0].get("n_quantiles", len(groups))
        lo, hi = min(a["maxValue"] for a in g), max(a["maxValue"] for a in g)
        qhtml += (f'<h3 class="meta">quantile {q + 1} of {nq} (sampled; values {fmt(lo)}–{fmt(hi)})</h3>'
                  + "".join(example_html(a, scale) for a in g))
    body = (f'<p class="meta">{nav}</p><h1>Latent {i}: {_e(rec["label"])}</h1>'
            f'<p class="meta">{_e(sae.get("hook_point", ""))} · {_e(doc.get("model", ""))} · '
            f'{_e(sae.get("architecture", ""))} d_sae={_e(sae.get("d_sae", ""))}</p>'
            f'<div class="row"><div><h2>Statistics</h2>{stats}</div><div><h2>Activation histogram</h2>{hist}</div></div>'
            f'<div class="row">{logits}</div>'
            f'<h2>Top activations</h2>{ex}'
            + (f"<h2>Examples by activation quantile</h2>{qhtml}" if qhtml else ""))
    return page(f"latent {i}: {rec['label']}", body)


def index_page(doc: dict) -> str:
    lat = doc["latents"]
    sae, store = doc.get("sae", {}), doc.get("store", {})
    rows = []
    for e in lat:
        rows.append(f'<tr data-index="{e["index"]}" data-label="{_e(e["label"])}" data-density="{e["frac_nonzero"]:.6g}" '
                    f'data-max="{e["maxActApprox"]:.6g}" data-mean="{e["mean_act"]:.6g}">'
                    f'<td class="n"><a href="{_e(e["file"][:-5])}.html">{e["index"]}</a></td>'
                    f'<td>{_e(e["label"])}</td><td class="n">{pct(e["frac_nonzero"])}</td>'
                    f'<td class="n">{fmt(e["maxActApprox"])}</td><td class="n">{fmt(e["mean_act"])}</td></tr>')
    alive = [e["frac_nonzero"] for e in lat if e["frac_nonzero"] > 0]
    dens = ""
    if alive:
        logs = [math.log10(v) for v in alive]
        lo, hi = math.floor(min(logs)), math.ceil(max(logs) + 1e-9)
        nb = max(1, min(40, (hi - lo) * 8))
        counts = [0] * nb
        for v in logs:
            counts[min(nb - 1, int((v - lo) / (hi - lo + 1e-12) * nb))] += 1
        step = (hi - lo) / nb
        dens = bars_svg(counts, [lo + (j + 0.5) * step for j in range(nb)], width=460, color="#4a8f5a",
                        xlabel="log10 density (fraction of tokens where the latent fires)",
                        title_fmt=lambda j, c, x: f"10^{x - step / 2:.2f} – 10^{x + step / 2:.2f}: {c} latents")
    n_dead = len(lat) - len(alive)
    body = (f'<h1>SAE latents: {_e(sae.get("hook_point", ""))}</h1>'
            f'<p class="meta">{_e(doc.get("model", ""))} · {_e(sae.get("architecture", ""))} d_sae={len(lat)} · '
            f'store {_e(store.get("path", ""))} [{_e(store.get("split", ""))}], {store.get("rows_counted", "?")} tokens · '
            f'{n_dead} latents never fired</p>'
            f'<div class="row"><div>{dens}</div></div>'
            f'<div class="controls"><input type="search" id="filter" placeholder="filter by label or index">'
            f'<label><input type="checkbox" id="alive"> fired only</label>'
            f'<span class="meta"><span id="shown">{len(lat)}</span> shown · click a column to sort</span></div>'
            f'<table id="latents"><thead><tr><th class="n" data-key="index" data-type="num">latent</th>'
            f'<th data-key="label" data-type="str">label</th><th class="n" data-key="density" data-type="num">density</th>'
            f'<th class="n" data-key="max" data-type="num">max act</th><th class="n" data-key="mean" data-type="num">mean act</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return page(f"SAE latents {sae.get('hook_point', '')}", body, INDEX_JS)


def render_dashboard(out: str | Path, latents: list[int] | None = None, quiet: bool = True) -> Path:
    """Write DIR/index.html and DIR/latents/NNNNN.html from DIR/features.json; returns index.html."""
    out = Path(out)
    doc = load_features(out)
    n = len(doc["latents"])
    (out / LATENT_DIR).mkdir(exist_ok=True)
    todo = range(n) if latents is None else latents
    for i in progress(todo, total=len(todo), desc="pages", unit="page", quiet=quiet):
        rec = load_latent(out, i)
        (out / LATENT_DIR / f"{i:05d}.html").write_text(latent_page(rec, doc, n), encoding="utf-8")
    (out / "index.html").write_text(index_page(doc), encoding="utf-8")
    return out / "index.html"
