/* saeforge viewer: the index of latents and one view per latent, from the data files that
 * `saeforge features` writes (data/index.js, data/vocab.js, data/shards/NNNNN.js). Those files
 * register themselves through the `saeforge.*` callbacks below, so the page works from file://
 * and when served by `saeforge serve` (which adds the live endpoints under /api/).
 *
 * Corpus text is only ever put into the page as text (textContent, createTextNode, title
 * attributes): never as markup. */
"use strict";
(function () {
  const S = (window.saeforge = window.saeforge || {});
  const st = { index: null, vocab: null, expl: null, live: null, shardWaiters: new Map(), shards: new Map(),
               order: null, view: null, sort: { key: "index", dir: 1 }, rowH: 26 };
  S.timings = {};
  S.ready = false;

  // ---- data callbacks (called by the data files) ---------------------------------------------
  S.index = function (doc) { st.index = doc; };
  S.vocab = function (v) { st.vocab = v; };
  S.tokens = function (t) { st.topTokens = t; };
  S.explanations = function (doc) { st.expl = doc; };
  S.shard = function (s, b64) {
    const w = st.shardWaiters.get(s);
    if (w) { st.shardWaiters.delete(s); w(b64); }
  };

  function loadScript(src) {
    return new Promise(function (resolve, reject) {
      const el = document.createElement("script");
      el.src = src;
      el.onload = function () { resolve(); };
      el.onerror = function () { reject(new Error("could not load " + src)); };
      document.head.appendChild(el);
    });
  }

  // ---- shards: base64 → zlib → safetensors → typed arrays -------------------------------------
  let F16 = null;
  function f16table() {
    if (F16) return F16;
    F16 = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
      F16[h] = e === 0 ? s * m * 5.960464477539063e-8 : e === 31 ? (m ? NaN : s * Infinity)
        : s * Math.pow(2, e - 15) * (1 + m / 1024);
    }
    return F16;
  }
  function typed(dtype, buf) {
    switch (dtype) {
      case "U8": return new Uint8Array(buf);
      case "I8": return new Int8Array(buf);
      case "U16": return new Uint16Array(buf);
      case "I16": return new Int16Array(buf);
      case "U32": return new Uint32Array(buf);
      case "I32": return new Int32Array(buf);
      case "F32": return new Float32Array(buf);
      case "F64": return new Float64Array(buf);
      case "I64": { const b = new BigInt64Array(buf), o = new Float64Array(b.length);
        for (let i = 0; i < b.length; i++) o[i] = Number(b[i]); return o; }
      case "F16": { const h = new Uint16Array(buf), t = f16table(), o = new Float32Array(h.length);
        for (let i = 0; i < h.length; i++) o[i] = t[h[i]]; return o; }
      default: throw new Error("unknown dtype " + dtype);
    }
  }
  function parseSafetensors(buf) {
    const n = Number(new DataView(buf).getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, n)));
    const base = 8 + n, out = {};
    for (const k of Object.keys(header)) {
      if (k === "__metadata__") continue;
      const h = header[k], a = h.data_offsets[0], b = h.data_offsets[1];
      out[k] = { shape: h.shape, data: typed(h.dtype, buf.slice(base + a, base + b)) };
    }
    return out;
  }
  async function decodeShard(b64) {
    const bin = atob(b64), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    const stream = new Blob([u]).stream().pipeThrough(new DecompressionStream("deflate"));
    return parseSafetensors(await new Response(stream).arrayBuffer());
  }
  function shard(s) {
    if (!st.shards.has(s)) {
      const p = new Promise(function (resolve) { st.shardWaiters.set(s, resolve); })
        .then(decodeShard);
      const name = "data/shards/" + String(s).padStart(5, "0") + ".js";
      loadScript(name).catch(function (e) { st.shardWaiters.delete(s); st.shards.delete(s); fail(e.message); });
      st.shards.set(s, p);
    }
    return st.shards.get(s);
  }

  // ---- small helpers ------------------------------------------------------------------------
  function el(tag, attrs, kids) {
    const e = document.createElement(tag);
    if (attrs) for (const k of Object.keys(attrs)) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    if (kids) for (const c of kids) if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const k of Object.keys(attrs || {})) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 100) return v.toFixed(0);
    return a >= 1e-3 ? String(Number(v.toPrecision(3))) : v.toExponential(1);
  }
  // where the dictionary reads: one hook point, or a crosscoder's hook points
  function hookPoints(m) {
    const sae = m.sae || {};
    return sae.hook_point || (sae.hook_points || []).join(" + ") || null;
  }
  function pct(v) { return v === 0 ? "0" : v >= 1e-5 ? Number((100 * v).toPrecision(3)) + "%" : (100 * v).toExponential(1) + "%"; }
  function fail(msg) { const s = document.getElementById("status"); s.hidden = false; s.className = "error"; s.textContent = msg; }
  function tokStr(id) {
    const v = st.vocab;
    return v && id >= 0 && id < v.length ? v[id] : "<" + id + ">";
  }

  // Whitespace marks: newlines, tabs and carriage returns always; spaces only at the very start or
  // end of a context, where they would otherwise be invisible.
  const MARK = { "\n": "↵", "\t": "⇥", "\r": "␍" };
  function appendText(parent, s, leading, trailing) {
    let buf = "";
    const flush = function () { if (buf) { parent.appendChild(document.createTextNode(buf)); buf = ""; } };
    const chars = Array.from(s);
    let lead = leading ? chars.findIndex(function (c) { return !/\s/.test(c); }) : 0;
    if (lead < 0) lead = chars.length;
    let trail = chars.length;
    if (trailing) { trail = chars.length; while (trail > 0 && /\s/.test(chars[trail - 1])) trail--; }
    chars.forEach(function (c, j) {
      const edge = j < lead || j >= trail;
      const m = MARK[c] || (edge && c === " " ? "␣" : null);
      if (m) { flush(); parent.appendChild(el("span", { cls: "ws", text: m })); }
      else buf += c;
    });
    flush();
  }

  // One context: tokens shaded by activation (alpha = value / scale), the centre outlined, the value
  // in each shaded token's tooltip. Silent tokens are plain text.
  function context(ids, vals, centre, scale, label) {
    const div = el("div", { cls: "ex" });
    if (label !== undefined) div.appendChild(el("span", { cls: "v", text: label }));
    const n = ids.length;
    for (let j = 0; j < n; j++) {
      const s = tokStr(ids[j]), v = vals[j];
      const lead = j === 0, trail = j === n - 1;
      if (v === 0 && j !== centre) { appendText(div, s, lead, trail); continue; }
      const span = el("span", { cls: j === centre ? "t max" : "t", title: "activation " + Number(v.toPrecision(4)) });
      const a = scale > 0 ? Math.max(0, Math.min(1, v / scale)) : 0;
      if (a > 0) span.style.background = "rgba(255,140,0," + a.toFixed(2) + ")";
      appendText(span, s, lead, trail);
      if (!span.firstChild) span.appendChild(document.createTextNode("\u200b"));
      div.appendChild(span);
    }
    return div;
  }

  function bars(heights, centres, opt) {
    opt = opt || {};
    const W = opt.width || 420, H = opt.height || 130, pl = 36, pb = 28, pt = 6, w = W - pl - 6, h = H - pb - pt;
    const box = el("div", { cls: "chart" });
    if (!heights.length) { box.appendChild(el("p", { cls: "meta", text: "no data" })); return box; }
    const vals = heights.map(function (x) { return opt.logY ? Math.log10(1 + x) : x; });
    const top = Math.max.apply(null, vals) || 1, bw = w / heights.length;
    const s = svg("svg", { width: W, height: H, role: "img" });
    s.appendChild(svg("line", { x1: pl, y1: pt + h, x2: pl + w, y2: pt + h, stroke: "#999" }));
    vals.forEach(function (v, j) {
      const bh = (h * v) / top;
      const r = svg("rect", { x: (pl + j * bw).toFixed(2), y: (pt + h - bh).toFixed(2), width: Math.max(bw - 1, 0.8).toFixed(2),
                              height: bh.toFixed(2), fill: opt.color || "#f08a24" });
      const t = svg("title", {});
      t.textContent = opt.tip ? opt.tip(j, heights[j], centres[j]) : fmt(centres[j]) + ": " + heights[j];
      r.appendChild(t);
      s.appendChild(r);
    });
    const txt = function (x, y, str, anchor) {
      const t = svg("text", { x: x, y: y, "text-anchor": anchor || "start" }); t.textContent = str; s.appendChild(t);
    };
    txt(pl, H - 14, fmt(centres[0]));
    txt(pl + w, H - 14, fmt(centres[centres.length - 1]), "end");
    txt(pl + w / 2, H - 2, opt.xlabel || "", "middle");
    txt(pl - 4, pt + 8, fmt(Math.max.apply(null, heights)), "end");
    box.appendChild(s);
    return box;
  }

  // ---- the index ----------------------------------------------------------------------------
  const COLS = [
    { key: "index", title: "latent", num: true, cls: "n" },
    { key: "label", title: "label / explanation", num: false },
    { key: "density", title: "density", num: true, cls: "n" },
    { key: "max", title: "max act", num: true, cls: "n" },
    { key: "mean", title: "mean act", num: true, cls: "n" },
    { key: "score", title: "score", num: true, cls: "n" },
  ];
  function column(key) {
    const c = st.index.columns, n = st.index.layout.n_latents;
    if (key === "index") { const a = new Float64Array(n); for (let i = 0; i < n; i++) a[i] = i; return a; }
    if (key === "score") return st.explScore || new Float64Array(n).fill(NaN);
    return c[key];
  }
  function sortOrder() {
    const n = st.index.layout.n_latents, key = st.sort.key, dir = st.sort.dir;
    const o = new Int32Array(n);
    for (let i = 0; i < n; i++) o[i] = i;
    if (key === "label") {
      const lab = lowerLabels();
      o.sort(function (a, b) { return (lab[a] < lab[b] ? -1 : lab[a] > lab[b] ? 1 : a - b) * dir; });
    } else if (key !== "index" || dir !== 1) {
      const v = Float64Array.from(column(key), function (x) { return Number.isNaN(x) ? -Infinity : x; });
      o.sort(function (a, b) { return (v[a] - v[b]) * dir || a - b; });
    }
    return o;
  }
  function lowerLabels() {
    if (!st.lower) st.lower = st.index.columns.label.map(function (s) { return s.toLowerCase(); });
    return st.lower;
  }
  function tokenMatches(q) {
    // vocabulary ids whose text, trimmed and lower-cased, equals the query
    const want = q.trim().toLowerCase();
    if (!want || !st.vocab) return new Set();
    return new Set(vocabKey().get(want) || []);
  }
  function vocabKey() {
    if (!st.vocabKey) {
      st.vocabKey = new Map();
      st.vocab.forEach(function (s, i) {
        const k = s.trim().toLowerCase();
        if (!st.vocabKey.has(k)) st.vocabKey.set(k, []);
        st.vocabKey.get(k).push(i);
      });
    }
    return st.vocabKey;
  }
  function applyFilter() {
    const t0 = performance.now();
    const n = st.index.layout.n_latents, c = st.index.columns;
    const q = document.getElementById("q").value.trim().toLowerCase();
    const tq = document.getElementById("tok").value;
    const alive = document.getElementById("alive").checked;
    const dmin = parseFloat(document.getElementById("dmin").value), dmax = parseFloat(document.getElementById("dmax").value);
    const exact = /^#?\d+$/.test(q) ? parseInt(q.replace("#", ""), 10) : -1;
    const toks = tokenMatches(tq), per = st.index.layout.top_tokens, tt = st.topTokens || [];
    const order = st.order, dens = c.density, out = [], lower = q ? lowerLabels() : null;
    for (let k = 0; k < n; k++) {
      const i = order[k];
      if (alive && !(c.count[i] > 0)) continue;
      if (!Number.isNaN(dmin) && !(dens[i] >= dmin)) continue;
      if (!Number.isNaN(dmax) && !(dens[i] <= dmax)) continue;
      if (q && i !== exact && lower[i].indexOf(q) < 0 && !(st.explLower && st.explLower[i].indexOf(q) >= 0)) continue;
      if (tq.trim()) {
        let hit = false;
        for (let j = 0; j < per; j++) if (toks.has(tt[i * per + j])) { hit = true; break; }
        if (!hit) continue;
      }
      out.push(i);
    }
    st.view = out;
    document.getElementById("shown").textContent = out.length.toLocaleString("en") + " of " + n.toLocaleString("en") + " latents";
    document.getElementById("spacer").style.height = out.length * st.rowH + "px";
    document.getElementById("list").scrollTop = 0;
    renderRows(true);
    S.timings.filter = performance.now() - t0;
  }
  function setSort(key) {
    const t0 = performance.now();
    const col = COLS.find(function (c) { return c.key === key; });
    if (st.sort.key === key) st.sort.dir = -st.sort.dir;
    else st.sort = { key: key, dir: col.num && key !== "index" ? -1 : 1 };
    st.order = sortOrder();
    document.querySelectorAll("#head > span").forEach(function (h) {
      h.removeAttribute("aria-sort");
      if (h.dataset.key === key) h.setAttribute("aria-sort", st.sort.dir > 0 ? "ascending" : "descending");
    });
    applyFilter();
    S.timings.sort = performance.now() - t0;
  }
  function renderRows(force) {
    const list = document.getElementById("list"), rows = document.getElementById("rows");
    const first = Math.max(0, Math.floor(list.scrollTop / st.rowH) - 5);
    const last = Math.min(st.view.length, first + Math.ceil(list.clientHeight / st.rowH) + 10);
    if (!force && st.drawn && st.drawn[0] === first && st.drawn[1] === last) return;
    st.drawn = [first, last];
    const c = st.index.columns, frag = document.createDocumentFragment();
    for (let k = first; k < last; k++) {
      const i = st.view[k];
      const lbl = el("span", { cls: "lbl" }, [el("a", { href: "#/latent/" + i, text: c.label[i] })]);
      if (st.explText && st.explText[i]) lbl.appendChild(el("span", { cls: "ex-text", text: st.explText[i] }));
      const sc = st.explScore ? st.explScore[i] : NaN;
      const row = el("div", { cls: "row", "data-index": i }, [
        el("span", { cls: "n" }, [el("a", { href: "#/latent/" + i, text: String(i) })]), lbl,
        el("span", { cls: "n", text: pct(c.density[i]) }), el("span", { cls: "n", text: fmt(c.max[i]) }),
        el("span", { cls: "n", text: fmt(c.mean[i]) }), el("span", { cls: "n score", text: Number.isNaN(sc) ? "" : sc.toFixed(2) })]);
      frag.appendChild(row);
    }
    rows.style.transform = "translateY(" + first * st.rowH + "px)";
    rows.replaceChildren(frag);
  }
  function densityChart() {
    const d = st.index.columns.density, logs = [];
    for (let i = 0; i < d.length; i++) if (d[i] > 0) logs.push(Math.log10(d[i]));
    const box = document.getElementById("density");
    box.replaceChildren();
    if (!logs.length) return;
    let lo = Infinity, hi = -Infinity;
    for (const v of logs) { if (v < lo) lo = v; if (v > hi) hi = v; }
    lo = Math.floor(lo); hi = Math.ceil(hi + 1e-9);
    const nb = Math.max(1, Math.min(40, (hi - lo) * 8)), counts = new Array(nb).fill(0), step = (hi - lo) / nb;
    for (const v of logs) counts[Math.min(nb - 1, Math.floor((v - lo) / (hi - lo + 1e-12) * nb))]++;
    box.appendChild(bars(counts, counts.map(function (_, j) { return lo + (j + 0.5) * step; }), {
      width: 460, color: "#4a8f5a", xlabel: "log10 density (fraction of tokens where the latent fires)",
      tip: function (j, c, x) { return "10^" + (x - step / 2).toFixed(2) + " – 10^" + (x + step / 2).toFixed(2) + ": " + c + " latents"; } }));
  }
  function buildIndex() {
    const head = document.getElementById("head");
    COLS.forEach(function (c) {
      const h = el("span", { cls: c.cls || "", text: c.title, "data-key": c.key, role: "button", tabindex: "0" });
      h.addEventListener("click", function () { setSort(c.key); });
      head.appendChild(h);
    });
    ["q", "tok", "dmin", "dmax"].forEach(function (id) { document.getElementById(id).addEventListener("input", applyFilter); });
    document.getElementById("alive").addEventListener("change", applyFilter);
    const list = document.getElementById("list");
    list.addEventListener("scroll", function () { requestAnimationFrame(function () { renderRows(false); }); });
    window.addEventListener("resize", function () { renderRows(true); });
    st.order = sortOrder();
    setTimeout(densityChart, 0);  // decoration: after the table is usable
  }

  // ---- one latent ---------------------------------------------------------------------------
  function pick(t, name, j) {
    const a = t[name];
    if (!a) return null;
    const per = a.shape.slice(1).reduce(function (x, y) { return x * y; }, 1);
    return a.data.subarray(j * per, (j + 1) * per);
  }
  async function renderLatent(i) {
    const t0 = performance.now();
    const lay = st.index.layout, n = lay.n_latents;
    const view = document.getElementById("latent-view");
    if (!(i >= 0 && i < n)) { view.replaceChildren(el("p", { cls: "error", text: "latent " + i + " is out of range (0.." + (n - 1) + ")" })); return; }
    const s = Math.floor(i / lay.shard_size), j = i - s * lay.shard_size;
    const [t] = await Promise.all([shard(s), st.vocabReady]);
    if (st.current !== i) return;
    const c = st.index.columns, W = 2 * lay.window + 1, E = t.ex_kind.shape[1];
    const stats = pick(t, "stats", j), mx = stats[1];
    const nav = el("p", { cls: "meta" }, [el("a", { href: "#/", text: "all latents" }),
      i > 0 ? " · " : null, i > 0 ? el("a", { href: "#/latent/" + (i - 1), text: "← " + (i - 1) }) : null,
      i + 1 < n ? " · " : null, i + 1 < n ? el("a", { href: "#/latent/" + (i + 1), text: (i + 1) + " →" }) : null]);
    const parts = [nav, el("h1", { text: "Latent " + i + ": " + c.label[i] })];
    if (st.explText && st.explText[i]) {
      const sc = st.explScore[i], ls = st.explLabelScore[i];
      parts.push(el("p", { cls: "explanation", text: st.explText[i] }));
      parts.push(el("p", { cls: "meta score", text: "detection score (balanced accuracy): explanation " + (Number.isNaN(sc) ? "–" : sc.toFixed(2)) +
        " · token-list label " + (Number.isNaN(ls) ? "–" : ls.toFixed(2)) }));
    }
    const m = st.index;
    parts.push(el("p", { cls: "meta", text: [hookPoints(m), m.model, m.sae && m.sae.architecture,
      "d_sae=" + n].filter(Boolean).join(" · ") }));
    const count = pick(t, "count", j)[0], rows = (m.store && m.store.rows_counted) || "?";
    const statTable = el("table", { cls: "stats" }, [
      el("tr", {}, [el("td", { text: "density" }), el("td", { cls: "n", text: pct(stats[0]) }), el("td", { text: "(" + count + " of " + rows + " tokens)" })]),
      el("tr", {}, [el("td", { text: "max activation" }), el("td", { cls: "n", text: fmt(mx) })]),
      el("tr", {}, [el("td", { text: "mean (all tokens)" }), el("td", { cls: "n", text: fmt(stats[2]) })]),
      el("tr", {}, [el("td", { text: "mean when active" }), el("td", { cls: "n", text: fmt(stats[3]) })])]);
    const hist = Array.from(pick(t, "hist", j)), up = pick(t, "hist_upper", j)[0], nb = hist.length, bw = up / nb;
    let last = hist.length; while (last > 0 && hist[last - 1] === 0) last--;
    const hchart = bars(hist.slice(0, last), hist.slice(0, last).map(function (_, k) { return (k + 0.5) * bw; }), {
      xlabel: "activation (non-zero)", tip: function (k, cnt, x) { return fmt(x - bw / 2) + " – " + fmt(x + bw / 2) + ": " + cnt + " tokens"; } });
    parts.push(el("div", { cls: "flex" }, [el("div", {}, [el("h2", { text: "Statistics" }), statTable]),
      el("div", {}, [el("h2", { text: "Activation histogram" }), hchart])]));
    if (t.pos_ids) {
      const logitTable = function (ids, vals, cls) {
        return el("table", { cls: "logits" }, Array.from(ids).map(function (id, k) {
          const cell = el("td", { cls: "tok " + cls }); appendText(cell, tokStr(id), true, true);
          return el("tr", {}, [cell, el("td", { cls: "n", text: (vals[k] >= 0 ? "+" : "") + vals[k].toFixed(3) })]);
        }));
      };
      const lr = pick(t, "logit_range", j), lh = Array.from(pick(t, "logit_hist", j)), lw = (lr[1] - lr[0]) / lh.length;
      const from = m.sae && m.sae.logits_from;  // a transcoder's target, a crosscoder's last layer
      if (from && from !== hookPoints(m)) parts.push(el("p", { cls: "meta logits-from", text: "logits of the decoder into " + from }));
      parts.push(el("div", { cls: "flex" }, [
        el("div", {}, [el("h2", { text: "Positive logits" }), logitTable(pick(t, "pos_ids", j), pick(t, "pos_values", j), "pos")]),
        el("div", {}, [el("h2", { text: "Negative logits" }), logitTable(pick(t, "neg_ids", j), pick(t, "neg_values", j), "neg")]),
        el("div", {}, [el("h2", { text: "Logit distribution" }), bars(lh, lh.map(function (_, k) { return lr[0] + (k + 0.5) * lw; }),
          { width: 300, color: "#6d8fd6", xlabel: "logit effect over the vocabulary" })])]));
    }
    const kinds = pick(t, "ex_kind", j), toks = pick(t, "tokens", j), acts = pick(t, "acts", j);
    const evals = pick(t, "ex_value", j), nq = pick(t, "n_quantiles", j)[0];
    const pad = lay.token_dtype === "U16" ? 65535 : -1;
    const example = function (e) {
      const ids = [], vs = [];
      let centre = -1;
      for (let k = 0; k < W; k++) {
        const id = toks[e * W + k];
        if (id === pad) continue;
        if (k === lay.window) centre = ids.length;
        ids.push(id); vs.push(acts[e * W + k]);
      }
      return context(ids, vs, centre, mx, fmt(evals[e]));
    };
    const top = [], groups = new Map();
    for (let e = 0; e < E; e++) {
      if (kinds[e] === 0) top.push(example(e));
      else if (kinds[e] > 0) { const q = kinds[e] - 1; if (!groups.has(q)) groups.set(q, []); groups.get(q).push(e); }
    }
    parts.push(el("h2", { text: "Top activations" }));
    if (top.length) top.forEach(function (d) { parts.push(d); });
    else parts.push(el("p", { cls: "meta", text: "this latent never fired on these tokens" }));
    if (groups.size) {
      parts.push(el("h2", { text: "Examples by activation quantile" }));
      Array.from(groups.keys()).sort(function (a, b) { return b - a; }).forEach(function (q) {
        const es = groups.get(q), vs = es.map(function (e) { return evals[e]; });
        parts.push(el("h3", { cls: "meta", text: "quantile " + (q + 1) + " of " + nq + " (sampled; values " +
          fmt(Math.min.apply(null, vs)) + "–" + fmt(Math.max.apply(null, vs)) + ")" }));
        es.forEach(function (e) { parts.push(example(e)); });
      });
    }
    if (st.live) parts.push(tryPanel(i, mx), steerPanel(i, mx));
    view.replaceChildren.apply(view, parts);
    S.timings.latent = performance.now() - t0;
    S.timings.latentIndex = i;
  }

  // ---- live endpoints (saeforge serve) --------------------------------------------------------
  async function api(path, body) {
    const r = await fetch("api/" + path, { method: body ? "POST" : "GET", headers: { "Content-Type": "application/json" },
                                           body: body ? JSON.stringify(body) : undefined });
    let doc;
    try { doc = await r.json(); } catch (e) { throw new Error("server answered " + r.status + " without JSON"); }
    if (!r.ok || doc.error) throw new Error(doc.error || "server answered " + r.status);
    return doc;
  }
  function tokenRow(tokens, shadeOf, onPick) {
    const box = el("div", { cls: "ex live" });
    tokens.forEach(function (tk, k) {
      const span = el("span", { cls: "tok" + (tk.special ? " special" : ""), "data-k": k });
      appendText(span, tk.text, k === 0, k === tokens.length - 1);
      if (!span.firstChild) span.appendChild(document.createTextNode("\u200b"));
      const sh = shadeOf(tk);
      if (sh.alpha > 0) { span.style.background = "rgba(255,140,0," + sh.alpha.toFixed(2) + ")"; span.classList.add("active"); }
      span.setAttribute("title", sh.title);
      if (onPick) span.addEventListener("click", function () { onPick(k, span); });
      box.appendChild(span);
    });
    return box;
  }
  function latentMax(i) { const m = st.index.columns.max[i]; return m > 0 ? m : 1; }
  function tryPanel(i, mx) {
    const ta = el("textarea", { rows: "3", placeholder: "Type text to see where latent " + i + " fires", "aria-label": "try text" });
    const out = el("div", {}), msg = el("span", { cls: "meta" });
    let timer = null;
    ta.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(async function () {
        if (!ta.value) { out.replaceChildren(); return; }
        try {
          const doc = await api("tokens", { text: ta.value, latent: i });
          msg.textContent = doc.tokens.length + " tokens";
          out.replaceChildren(tokenRow(doc.tokens, function (tk) {
            const v = tk.value || 0;
            return { alpha: Math.max(0, Math.min(1, v / (mx || 1))), title: "latent " + i + ": " + Number(v.toPrecision(4)) };
          }));
        } catch (e) { msg.textContent = e.message; msg.className = "error"; }
      }, 200);
    });
    return el("div", { cls: "panel" }, [el("h2", { text: "Try it" }), ta, msg, out]);
  }
  function steerPanel(i, mx) {
    const coeff = el("input", { type: "text", size: "7", value: String(Number((4 * (mx || 1)).toPrecision(2))), "aria-label": "steering coefficient" });
    const prompt = el("input", { type: "text", size: "50", value: "I think that", "aria-label": "steering prompt" });
    const ntok = el("input", { type: "text", size: "4", value: "30", "aria-label": "tokens to generate" });
    const btn = el("button", { type: "button", text: "Steer" });
    const out = el("div", { cls: "side" }), msg = el("p", { cls: "meta" });
    btn.addEventListener("click", async function () {
      btn.disabled = true; msg.className = "meta"; msg.textContent = "generating…";
      try {
        const doc = await api("steer", { latent: i, coeff: parseFloat(coeff.value), prompt: prompt.value,
                                         max_new_tokens: parseInt(ntok.value, 10) });
        msg.textContent = "prompt " + JSON.stringify(doc.prompt) + ", coefficient " + doc.coeff + " × decoder row at " + doc.hook_point +
          ", seed " + doc.seed;
        out.replaceChildren(el("div", {}, [el("h3", { text: "base" }), el("pre", { cls: "base", text: doc.base })]),
                            el("div", {}, [el("h3", { text: "steered" }), el("pre", { cls: "steered", text: doc.steered })]));
      } catch (e) { msg.className = "error"; msg.textContent = e.message; }
      btn.disabled = false;
    });
    return el("div", { cls: "panel" }, [el("h2", { text: "Steer with latent " + i }),
      el("div", { cls: "controls" }, [el("label", {}, ["coefficient ", coeff]), el("label", {}, ["prompt ", prompt]),
                                       el("label", {}, ["tokens ", ntok]), btn]), msg, out]);
  }
  function buildLive() {
    const ta = document.getElementById("live-text"), lat = document.getElementById("live-latent");
    const msg = document.getElementById("live-status"), box = document.getElementById("live-tokens");
    const detail = document.getElementById("live-detail");
    let timer = null, seq = 0;
    const run = async function () {
      const mine = ++seq, want = lat.value.trim() === "" ? null : parseInt(lat.value, 10);
      if (!ta.value) { box.replaceChildren(); detail.replaceChildren(); msg.textContent = ""; return; }
      try {
        const t0 = performance.now();
        const doc = await api("tokens", want === null ? { text: ta.value } : { text: ta.value, latent: want });
        if (mine !== seq) return;
        msg.className = "meta";
        msg.textContent = doc.tokens.length + " tokens · " + (performance.now() - t0).toFixed(0) + " ms";
        const row = tokenRow(doc.tokens, function (tk) {
          if (want !== null) { const v = tk.value || 0; return { alpha: Math.min(1, v / latentMax(want)), title: "latent " + want + ": " + Number(v.toPrecision(4)) }; }
          if (!tk.latents.length) return { alpha: 0, title: tk.special ? "special token (not encoded)" : "no latent fires" };
          const best = tk.latents[0];
          return { alpha: Math.min(1, best[1] / latentMax(best[0])),
                   title: tk.latents.slice(0, 5).map(function (p) { return "#" + p[0] + " " + Number(p[1].toPrecision(3)); }).join(", ") };
        }, function (k, span) {
          box.querySelectorAll(".sel").forEach(function (x) { x.classList.remove("sel"); });
          span.classList.add("sel");
          const tk = doc.tokens[k];
          detail.replaceChildren(el("div", { cls: "panel" }, [el("h2", { text: "Token " + JSON.stringify(tk.text) }),
            el("table", { cls: "stats" }, tk.latents.map(function (p) {
              return el("tr", {}, [el("td", {}, [el("a", { href: "#/latent/" + p[0], text: "#" + p[0] })]),
                                   el("td", { cls: "n", text: Number(p[1].toPrecision(4)) + "" }),
                                   el("td", { text: st.index.columns.label[p[0]] })]);
            }))]));
        });
        box.replaceChildren.apply(box, Array.from(row.childNodes));
        S.timings.live = performance.now() - t0;
      } catch (e) { msg.className = "error"; msg.textContent = e.message; }
    };
    const later = function () { clearTimeout(timer); timer = setTimeout(run, 150); };
    ta.addEventListener("input", later);
    lat.addEventListener("input", later);
  }

  // ---- routing --------------------------------------------------------------------------------
  function route() {
    const h = location.hash || "#/";
    const m = /^#\/latent\/(\d+)$/.exec(h);
    const show = function (id) {
      ["index-view", "latent-view", "live-view"].forEach(function (v) { document.getElementById(v).hidden = v !== id; });
    };
    if (m) {
      S.timings.latent = null;
      st.current = parseInt(m[1], 10);
      show("latent-view");
      window.scrollTo(0, 0);
      renderLatent(st.current).catch(function (e) { fail(e.message); });
    } else if (h === "#/live" && st.live) {
      st.current = null; show("live-view"); document.getElementById("live-text").focus();
    } else {
      st.current = null; show("index-view"); renderRows(true);
    }
  }

  async function start() {
    const t0 = performance.now();
    // a latent opened directly needs the vocabulary as soon as the index: load both at once then
    const early = /^#\/latent\//.test(location.hash) ? loadScript("data/vocab.js") : null;
    try { await loadScript("data/index.js"); } catch (e) { fail("data/index.js not found: run `saeforge features` (or `saeforge dashboard DIR`)"); return; }
    S.timings.indexLoadedAt = performance.now();
    if (!st.index) { fail("data/index.js did not register an index"); return; }
    st.vocabReady = early || loadScript("data/vocab.js");
    Promise.all([st.vocabReady, loadScript("data/tokens.js")]).then(function () {
      vocabKey();
      S.timings.vocabAt = performance.now();  // search by token works from here
      if (document.getElementById("tok").value) applyFilter();
    }).catch(function (e) { fail(e.message); });
    const explReady = loadScript("data/explanations.js").catch(function () { return null; });  // older dirs lack it
    const liveReady = location.protocol.startsWith("http") ? api("info").then(function (d) { st.live = d; }).catch(function () { return null; }) : Promise.resolve();
    const m = st.index, n = m.layout.n_latents, cnt = m.columns.count, rowsN = Math.max(m.layout.n_rows || 0, 1);
    m.columns.label = m.columns.labels.split("\n");
    const dens = new Float64Array(n);
    let dead = 0;
    for (let i = 0; i < n; i++) { dens[i] = cnt[i] / rowsN; if (!(cnt[i] > 0)) dead++; }
    m.columns.density = dens;
    const hp = hookPoints(m);
    document.getElementById("meta").textContent = [m.model, hp, m.sae && m.sae.architecture, "d_sae=" + n,
      m.store ? (m.store.rows_counted + " tokens [" + m.store.split + "]") : null].filter(Boolean).join(" · ");
    document.title = "saeforge latents " + (hp || "");
    buildIndex();
    document.getElementById("status").hidden = true;
    st.view = st.order;
    document.getElementById("spacer").style.height = n * st.rowH + "px";
    document.getElementById("shown").textContent = n.toLocaleString("en") + " latents · " + dead + " never fired";
    route();
    window.addEventListener("hashchange", route);
    S.timings.index = performance.now() - t0;
    S.timings.readyAt = performance.now();  // since navigation start
    S.ready = true;
    explReady.then(function () {
      if (!st.expl) return;
      const e = st.expl;
      st.explText = new Array(n).fill(""); st.explLower = new Array(n).fill("");
      st.explScore = new Float64Array(n).fill(NaN); st.explLabelScore = new Float64Array(n).fill(NaN);
      e.latents.forEach(function (i, k) {
        st.explText[i] = e.explanation[k]; st.explLower[i] = e.explanation[k].toLowerCase();
        st.explScore[i] = e.score[k] === null ? NaN : e.score[k]; st.explLabelScore[i] = e.label_score[k] === null ? NaN : e.label_score[k];
      });
      S.explained = true;
      renderRows(true);
      if (st.current !== null && st.current !== undefined) renderLatent(st.current);
    });
    liveReady.then(function () {
      if (!st.live) return;
      document.getElementById("live-link").hidden = false;
      buildLive();
      S.live = true;
      route();
    });
  }
  start();
})();
