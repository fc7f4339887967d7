"""Feature statistics against brute force on a real (small) store; logit attribution; labels; CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis.features import encode_triples, feature_stats
from analysis.features_io import Reader, load_index, quantile_template
from analysis.labels import label_tokens, logit_table, make_label
from collect.collector import CollectConfig, collect_activations
from saeforge.errors import UserError
from collect.store import Store
from sae.architectures import ArchConfig, build_sae
from sae.io import save_sae

HOOK = "layers.3.resid_post"


@pytest.fixture(scope="module")
def store(smollm2, wikitext_dir, tmp_path_factory) -> Store:
    d = tmp_path_factory.mktemp("feat")
    # paragraphs (no ` = Title = ` lines) so that documents are short and both splits get rows
    paras = [ln.strip() for ln in (wikitext_dir / "valid.txt").read_text().splitlines()[:400]
             if ln.strip() and not ln.strip().startswith("=")]
    (d / "paras.txt").write_text("\n\n".join(paras))
    out = d / "store.zarr"
    cfg = CollectConfig(corpus=str(d / "paras.txt"), hooks=[HOOK], context=64, max_tokens=3072,
                        shard_rows=256, out=str(out), quiet=True, heldout_fraction=0.3)
    return collect_activations(cfg, loaded=smollm2)


def make_sae(arch: str, d_in: int, d_sae: int = 384, k: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(ArchConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        if arch == "relu":
            sae.b_enc -= 4.0  # sparse, so that some latents fire rarely or never
    return sae.eval()


def dense_reference(sae, store: Store, split: str):
    mask = store.split_mask(split)
    x = torch.from_numpy(store.activations(HOOK)[mask])
    with torch.no_grad():
        f = sae.encode(x)
    return np.flatnonzero(mask), f


@pytest.mark.parametrize("arch,split", [("topk", "all"), ("relu", "heldout")])
def test_stats_equal_brute_force(store, arch, split):
    sae = make_sae(arch, store.d_model)
    top = 6
    st = feature_stats(sae, store, HOOK, split=split, top=top, samples=8, window=10, block_rows=200, encode_batch=97)
    rows, f = dense_reference(sae, store, split)
    n = len(rows)
    assert n > 200 and st.n_rows == n
    fired = (f > 0)
    assert torch.equal(st.count, fired.sum(0))
    torch.testing.assert_close(st.density, fired.double().mean(0))
    torch.testing.assert_close(st.max_act, f.max(0).values.clamp_min(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.mean_act.float(), f.mean(0), rtol=1e-4, atol=1e-6)
    assert (st.count == 0).any() or arch == "topk"
    # streaming top-k == dense top-k per latent (values and rows)
    dv, di = f.topk(top, dim=0)
    row_of = torch.from_numpy(rows)
    tokens, seq = store.tokens(), store.seq()
    val_at = {int(r): j for j, r in enumerate(rows)}
    for i in range(sae.cfg.d_sae):
        m = min(top, int(st.count[i]))
        torch.testing.assert_close(st.top.val[i, :m], dv[:m, i], rtol=1e-5, atol=1e-5)
        assert st.top.row[i, :m].tolist() == row_of[di[:m, i]].tolist()
        assert (st.top.row[i, m:] == -1).all()
        # contexts rebuilt from the store equal the tokens around the max position, with the latent's values
        for j in range(m):
            r = int(st.top.row[i, j])
            for o in range(-10, 11):
                t = int(st.top.tok[i, j, o + 10])
                inside = 0 <= r + o < store.n_tokens and seq[r + o] == seq[r]
                assert t == (int(tokens[r + o]) if inside else -1)
                want = float(f[val_at[r + o], i]) if inside and (r + o) in val_at else 0.0
                assert abs(float(st.top.win[i, j, o + 10]) - want) < 1e-4
        # reservoir samples are real non-zero activations, min(count, M) of them, distinct rows
        s = st.examples(i, "sample")
        assert len(s) == min(8, int(st.count[i]))
        assert len({e["row"] for e in s}) == len(s)
        for e in s:
            assert abs(float(f[val_at[e["row"]], i]) - e["value"]) < 1e-4
        # exact histogram: counts per bin equal numpy's over the same edges
        nz = f[:, i][f[:, i] > 0].numpy()
        assert int(st.hist.counts[i].sum()) == nz.size
        if nz.size:
            edges = st.hist.edges(i)
            assert edges[-1] > nz.max() >= edges[-1] / 2
            h, _ = np.histogram(nz, bins=edges)
            assert np.abs(h - st.hist.counts[i].numpy()).sum() <= 2  # float rounding at bin edges only


def test_encode_triples_match_dense(store):
    sae = make_sae("topk", store.d_model, k=5)
    x = torch.from_numpy(store.activations(HOOK, 0, 300))
    r, l, v = encode_triples(sae, x, batch=64)
    dense = torch.zeros(300, sae.cfg.d_sae)
    dense[r, l] = v
    torch.testing.assert_close(dense, sae.encode(x).detach())


def test_logit_attribution_is_direct(smollm2):
    model = smollm2.model
    torch.manual_seed(1)
    W_dec = torch.randn(7, 576)
    lt = logit_table(W_dec, model, top=5, batch=3)
    g = model.model.norm.weight.detach()
    direct = (W_dec * g) @ model.lm_head.weight.detach().t()
    dv, di = direct.topk(5, dim=1)
    torch.testing.assert_close(lt.pos_vals, dv, rtol=1e-4, atol=1e-4)
    assert torch.equal(lt.pos_ids, di)
    nv, ni = direct.topk(5, dim=1, largest=False)
    torch.testing.assert_close(lt.neg_vals, nv, rtol=1e-4, atol=1e-4)
    assert torch.equal(lt.neg_ids, ni)
    assert int(lt.hist_heights.sum(1)[0]) == model.lm_head.weight.shape[0]


def reference_quantiles(values: list[float], n_quantiles: int, per_bin: int) -> list[tuple[int, float]]:
    """The quantile picks spelled out: equal-count groups of the value-sorted sample, evenly spaced
    picks in each, highest group first and descending within a group."""
    s = sorted(values)
    groups = np.array_split(np.arange(len(s)), min(n_quantiles, len(s)))
    out = []
    for q in range(len(groups) - 1, -1, -1):
        g = groups[q]
        picks = sorted({int(g[int(round(x))]) for x in np.linspace(0, len(g) - 1, min(per_bin, len(g)))}, reverse=True)
        out += [(q, s[p]) for p in picks]
    return out


def test_quantile_template_matches_reference():
    rng = np.random.default_rng(0)
    for n in range(1, 17):
        vals = sorted(rng.random(n).tolist())
        got = [(q, vals[p]) for p, q in quantile_template(n, 4, 3)]
        assert got == reference_quantiles(vals, 4, 3)


def test_label():
    assert make_label([" the", " the", " a", "\n"], [" cat", " dog", " cat"]) == "the · a · ↵ → cat · dog"
    assert make_label([], []) == "(never fires)"
    assert label_tokens("the · a · ↵ → cat · dog") == 'The tokens "the", "a", "↵".'


def run_features(store, smollm2, tmp_path, monkeypatch, sae, *args):
    from analysis import features_cli
    sae_dir = save_sae(sae, tmp_path / "sae", meta={"hook_point": HOOK, "model": store.model_spec,
                                                    "model_hash": store.model_hash})
    monkeypatch.setattr(features_cli, "load_model", lambda spec, *a, **k: smollm2)
    out = tmp_path / "feat"
    rc = features_cli.main([str(sae_dir), "--store", store.path, "--out", str(out), "--quiet", *args])
    assert rc == 0
    return sae_dir, out


def test_features_cli_end_to_end(store, smollm2, tmp_path, monkeypatch):
    """The written records hold exactly the pass's statistics; 20 top examples + quantile samples fit
    in 4 KB per latent; mistakes are refused."""
    from analysis import features_cli
    sae = make_sae("topk", store.d_model, d_sae=64)
    sae_dir, out = run_features(store, smollm2, tmp_path, monkeypatch, sae, "--top", "20", "--shard-size", "16")
    doc = json.loads((out / "features.json").read_text(encoding="utf-8"))
    assert doc["layout"]["n_latents"] == 64 and doc["sae"]["hook_point"] == HOOK and doc["layout"]["n_shards"] == 4
    idx = load_index(out)["columns"]
    st = feature_stats(sae, store, HOOK, split="all", top=20, samples=16, window=10)
    assert idx["count"] == st.count.tolist()
    np.testing.assert_allclose(idx["max"], st.max_act.numpy(), rtol=1e-3)
    reader = Reader(out)
    tok = smollm2.tokenizer
    for i in (0, 17, 63):
        rec = reader.latent(i)
        top = [a for a in rec["activations"] if a["kind"] == "top"]
        ex = st.examples(i, "top")
        assert [a["row"] for a in top] == [e["row"] for e in ex]
        for a, e in zip(top, ex):
            assert a["maxValue"] == pytest.approx(e["value"], rel=1e-6)
            assert a["token_ids"] == [t for t in e["token_ids"] if t >= 0]
            assert a["values"][a["maxValueTokenIndex"]] == pytest.approx(e["value"], rel=1e-3)
            assert "".join(a["tokens"]) == tok.decode(a["token_ids"])
        quant = [a for a in rec["activations"] if a["kind"] == "quantile"]
        want = reference_quantiles([e["value"] for e in st.examples(i, "sample")], 4, 3)
        assert [(a["quantile"], a["maxValue"]) for a in quant] == [(q, pytest.approx(v, rel=1e-6)) for q, v in want]
        assert len(rec["pos_str"]) == 10 and rec["freq_hist_data_bar_heights"] == st.hist.counts[i].tolist()
    size = sum(f.stat().st_size for f in (out / "data").rglob("*") if f.is_file()) - (out / "data/vocab.js").stat().st_size
    assert size / 64 <= 4096, f"{size / 64:.0f} bytes per latent"
    assert (out / "index.html").is_file() and (out / "viewer.js").is_file()

    # mistakes: SAE from another hook; a store from another model
    bad = save_sae(sae, tmp_path / "bad", meta={"hook_point": "layers.5.resid_post", "model": store.model_spec,
                                                "model_hash": store.model_hash})
    with pytest.raises(UserError, match="layers.5.resid_post"):
        features_cli.main([str(bad), "--store", store.path, "--out", str(tmp_path / "x"), "--quiet"])
    other = save_sae(sae, tmp_path / "other", meta={"hook_point": HOOK, "model": store.model_spec,
                                                    "model_hash": "0" * 32})
    with pytest.raises(UserError, match="model"):
        features_cli.main([str(other), "--store", store.path, "--out", str(tmp_path / "y"), "--quiet"])


def test_features_out_is_a_file_fails_before_the_pass(store, tmp_path, monkeypatch, capsys):
    """Regression (issue 12): `--out FILE` used to run the whole pass, then raise NotADirectoryError."""
    from analysis import features, features_cli
    from saeforge.errors import run_cli
    sae = make_sae("topk", store.d_model, d_sae=16)
    sae_dir = save_sae(sae, tmp_path / "sae", meta={"hook_point": HOOK, "model": store.model_spec,
                                                    "model_hash": store.model_hash})
    f = tmp_path / "taken"
    f.write_text("not a directory")

    def no_work(*a, **k):
        raise AssertionError("the pass (or model load) ran before --out was checked")
    monkeypatch.setattr(features, "feature_stats", no_work)
    monkeypatch.setattr(features_cli, "load_model", no_work)
    rc = run_cli(features_cli.main, [str(sae_dir), "--store", store.path, "--out", str(f), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a file" in err[0] and str(f) in err[0]
    assert f.read_text() == "not a directory"
