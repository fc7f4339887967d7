"""`saeforge features` and the viewer on a Matryoshka SAE, a transcoder and a crosscoder, each trained
briefly on one small SmolLM2 store: the written latents are what the dictionary computes at its input
positions, the logits come from the decoder into its output (a crosscoder's last layer), and the viewer
in a real headless Chromium shows exactly that."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.features_io import load_features, load_index, load_latent
from sae.config import TrainConfig
from sae.io import load_sae
from sae.trainer import train
from tests.browser import browser, watched_page  # noqa: F401 - fixture
from tests.test_dashboard import shown_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

R_IN, R_OUT, R2, R3 = "layers.3.mlp_in", "layers.3.mlp_out", "layers.2.resid_post", "layers.3.resid_post"
KINDS = {"matryoshka": dict(hook=R3, arch=["matryoshka"]),
         "transcoder": dict(hook=R_IN, target=R_OUT),
         "crosscoder": dict(hooks=[R2, R3], arch=["crosscoder"])}
READS = {"matryoshka": [R3], "transcoder": [R_IN], "crosscoder": [R2, R3]}
WRITES = {"matryoshka": R3, "transcoder": R_OUT, "crosscoder": R3}
N_LOGITS = 6


@pytest.fixture(scope="module")
def made(smollm2, wikitext_dir, tmp_path_factory):
    """One store of 4 hook points; each kind trained for 4 steps; `saeforge features` on each."""
    from analysis import features_cli
    from tests.smollm_stores import paragraph_store
    tmp = tmp_path_factory.mktemp("dkinds")
    store = paragraph_store(smollm2, wikitext_dir, tmp, [R_IN, R_OUT, R2, R3], chars=30000, max_tokens=1024,
                            heldout_fraction=0.25)
    dirs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features_cli, "load_model", lambda spec, *a, **k: smollm2)
        for name, kw in KINDS.items():
            res = train(TrainConfig(store=store.path, out=str(tmp / name), k=[8], expansion=[1], batch_size=256,
                                    tokens=1024, wandb="disabled", quiet=True, scale_sample=1024, warmup_steps=1,
                                    eval_rows=128, checkpoint_every=0, **kw))
            feat = tmp / f"{name}_features"
            assert features_cli.main([str(res.out_dirs[0]), "--store", store.path, "--out", str(feat), "--top", "5",
                                      "--samples", "4", "--window", "3", "--logits", str(N_LOGITS), "--quiet"]) == 0
            dirs[name] = (Path(res.out_dirs[0]), feat)
    return store, dirs


def _inputs(store, name: str) -> torch.Tensor:
    """Every store row of what the dictionary reads, hook points side by side."""
    return torch.from_numpy(np.concatenate([store.activations(h) for h in READS[name]], axis=1))


def _logits(smollm2, W: torch.Tensor) -> torch.Tensor:
    """Decoder rows through SmolLM2's final RMSNorm gain and unembedding, computed here by hand."""
    lm = smollm2.model
    return (W.detach().float() * lm.model.norm.weight.detach().float()) @ lm.lm_head.weight.detach().float().T


def _busiest(feat: Path) -> int:
    count = load_index(feat)["columns"]["count"]
    return int(np.argmax(count))


@pytest.mark.smollm
def test_features_are_the_dictionarys_own_latents_and_logits(made, smollm2):
    store, dirs = made
    for name, (sae_dir, feat) in dirs.items():
        sae = load_sae(sae_dir)
        doc = load_features(feat)
        assert doc["layout"]["n_latents"] == sae.cfg.d_sae == 576
        assert doc["sae"]["hook_points"] == READS[name] and doc["sae"]["logits_from"] == WRITES[name], doc["sae"]
        assert doc["sae"]["hook_point"] == (None if name == "crosscoder" else READS[name][0])
        with torch.no_grad():
            f = sae.encode(_inputs(store, name))
        keep = torch.from_numpy(store.split_mask("all"))
        assert load_index(feat)["columns"]["count"] == (f[keep] > 0).sum(0).tolist(), name
        i = _busiest(feat)
        rec = load_latent(feat, i)
        top = [a for a in rec["activations"] if a["kind"] == "top"]
        assert len(top) == 5
        for a in top:  # each top example is the latent's value at that store row's input
            assert a["maxValue"] == pytest.approx(float(f[a["row"], i]), rel=1e-4), name
        assert [a["maxValue"] for a in top] == sorted((a["maxValue"] for a in top), reverse=True)
        W = sae.W_dec[:, sae.layer_slice(sae.cfg.n_layers - 1)]  # the decoder into the last output
        v, ids = _logits(smollm2, W[i]).topk(N_LOGITS)
        vocab = smollm2.tokenizer.batch_decode([[t] for t in ids.tolist()], clean_up_tokenization_spaces=False)
        assert rec["pos_str"] == vocab, name
        np.testing.assert_allclose(rec["pos_values"], v.numpy(), rtol=1e-4, atol=1e-5)
        if name == "crosscoder":  # the first layer's decoder would give other tokens
            assert _logits(smollm2, sae.W_dec[i, sae.layer_slice(0)]).topk(N_LOGITS).indices.tolist() != ids.tolist()


@pytest.mark.smollm
def test_viewer_shows_each_kind(made, browser):  # noqa: F811
    _, dirs = made
    for name, (_, feat) in dirs.items():
        cols = load_index(feat)["columns"]
        dead = sum(1 for c in cols["count"] if c == 0)
        i = _busiest(feat)
        rec = load_latent(feat, i)
        w = watched_page(browser)
        p = w.page
        p.goto((feat / "index.html").as_uri())
        p.wait_for_function("() => window.saeforge && window.saeforge.ready", timeout=30000)
        assert p.text_content("#shown") == f"576 latents · {dead} never fired", name
        assert " + ".join(READS[name]) in p.text_content("#meta")
        p.evaluate(f"location.hash = '#/latent/{i}'")
        p.wait_for_function(f"() => saeforge.timings.latent !== null && saeforge.timings.latentIndex === {i}")
        assert p.text_content("h1") == f"Latent {i}: {cols['label'][i]}"
        shown = p.evaluate("""Array.from(document.querySelectorAll('#latent-view .ex')).map(e =>
            e.querySelector('.t.max') ? e.querySelector('.t.max').title : null)""")
        acts = rec["activations"]
        assert len(shown) == len(acts) and len(acts) >= 5
        for tip, a in zip(shown, acts):  # the shaded maximum's tooltip: the value load_latent reads
            v = a["values"][a["maxValueTokenIndex"]]
            assert abs(float(tip.split()[1]) - v) <= 5e-4 * max(1.0, abs(v)), (name, tip, a["maxValue"])
        pos = p.evaluate("""Array.from(document.querySelectorAll('#latent-view table.logits')[0].rows).map(r =>
            [r.cells[0].textContent, r.cells[1].textContent])""")
        assert [t for t, _ in pos] == [shown_text([s]) for s in rec["pos_str"]], name
        assert [float(v) for _, v in pos] == pytest.approx(rec["pos_values"], abs=6e-4)
        note = p.locator("#latent-view .logits-from")
        if name == "matryoshka":
            assert note.count() == 0
        else:
            assert note.text_content() == f"logits of the decoder into {WRITES[name]}"
        assert w.errors == [] and w.dialogs == []
        p.close()


@pytest.mark.smollm
def test_live_endpoints_read_and_write_where_each_kind_does(made, smollm2, monkeypatch):
    """`saeforge serve` on the crosscoder's features: live text is encoded from both layers of one forward
    (checked against hidden_states); steering adds the latent's decoder row at each layer it writes, and a
    transcoder's at its target."""
    import collect.model
    from analysis.serve import Live
    _, dirs = made
    monkeypatch.setattr(collect.model, "load_model", lambda spec, *a, **k: smollm2)
    live = Live.from_features(dirs["crosscoder"][1])
    assert (live.inputs, live.outputs) == ([R2, R3], [R2, R3])
    text = "The cat sat on the mat because it was warm."
    got = live.tokens(text)["tokens"]
    ids = [smollm2.tokenizer.bos_token_id] + smollm2.tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        hs = smollm2.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        f = live.sae.encode(torch.cat([hs[3][0], hs[4][0]], -1))  # resid_post of blocks 2 and 3
    assert [t["id"] for t in got] == ids and got[0]["latents"] == []  # BOS is not encoded
    for j in range(1, len(ids)):
        v, i = f[j].topk(3)
        assert [la for la, _ in got[j]["latents"][:3]] == i.tolist()
        np.testing.assert_allclose([x for _, x in got[j]["latents"][:3]], v.numpy(), rtol=1e-4, atol=1e-5)
    out = live.steer(5, 4.0, "The weather today is", max_new_tokens=2, seed=0)
    assert out["hook_point"] == f"{R2},{R3}"
    # `explain` draws its non-activating contexts by encoding the crosscoder's layers side by side
    from analysis.explain import sample_negatives
    neg = sample_negatives(load_features(dirs["crosscoder"][1]), [], n_contexts=16)
    assert neg.active.shape == (16, 576) and neg.active[:, _busiest(dirs["crosscoder"][1])].any()
    tc = Live.from_features(dirs["transcoder"][1])
    assert (tc.inputs, tc.outputs) == ([R_IN], [R_OUT])
    assert tc.steer(5, 4.0, "The weather today is", max_new_tokens=2, seed=0)["hook_point"] == R_OUT
