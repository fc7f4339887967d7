"""Feature absorption against known answers: a synthetic SAE with planted absorbing latents reports
exactly the absorbed words, one without reports 0; word activations through the shared KV-cached
prefix equal running every prompt in full."""
import numpy as np
import pytest
import torch

from sae.absorption import absorption, vocabulary_words
from sae.architectures import ArchConfig, build_sae
from sae.bootstrap import BootstrapSpec

D = 48
N_ABS, PER_ABS = 20, 5  # 20 absorbing latents, each absorbing the letter 'a' on 5 words of its own


def _words(seed=0, per_letter=500):
    """x = u_letter + 0.3·w (w: a word-specific direction) + v_j for the 'a' words of absorber j."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0].T  # orthonormal rows
    u, v, rest = basis[:3], basis[3:3 + N_ABS], basis[3 + N_ABS:]
    xs, letters, absorber = [], [], []
    for li in range(3):
        for i in range(per_letter):
            w = rest.T @ rng.standard_normal(len(rest))
            x = u[li] + 0.3 * w / np.linalg.norm(w)
            j = i // PER_ABS if li == 0 and i < N_ABS * PER_ABS else -1
            if j >= 0:
                x = x + v[j]
            xs.append(x), letters.append(li), absorber.append(j)
    return np.asarray(xs, dtype=np.float32), np.array(letters), np.array(absorber), u, v


def _sae(u, v, planted: bool):
    """One latent per letter (fires 0.5 on its letter); the 'a' latent is silenced by any v_j, and
    latent j (planted) fires on v_j with a decoder half along u_a, or (clean) along v_j alone."""
    n = 3 + N_ABS
    enc, dec, b = np.zeros((n, D)), np.zeros((n, D)), np.zeros(n)
    enc[:3], dec[:3], b[:3] = u, u, -0.5
    for j in range(N_ABS):
        enc[3 + j] = 2 * v[j]
        b[3 + j] = -1.0
        d = u[0] + v[j] if planted else v[j]
        dec[3 + j] = d / np.linalg.norm(d)
        if planted:
            enc[0] -= 2 * v[j]
    sae = build_sae(ArchConfig("relu", D, n)).eval()
    with torch.no_grad():
        sae.enc.copy_(torch.from_numpy(enc).float())
        sae.W_dec.copy_(torch.from_numpy(dec).float())
        sae.b_enc.copy_(torch.from_numpy(b).float())
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def split():
    x, letters, absorber, u, v = _words()
    test = np.random.default_rng(1).random(len(x)) < 0.3
    return x, letters, absorber, test, u, v


@pytest.mark.parametrize("planted", [True, False])
def test_planted_absorbing_latents_are_reported_and_none_otherwise(split, planted):
    x, letters, absorber, test, u, v = split
    res = absorption(_sae(u, v, planted), x[~test], letters[~test], x[test], letters[test],
                     ci=BootstrapSpec(500, 0, 20))
    assert set(res["letters"]) == {"a", "b", "c"}
    a = res["letters"]["a"]
    assert a["main_latents"] == [0] and res["letters"]["b"]["main_latents"] == [1]
    assert a["n_true_positives"] == int((letters[test] == 0).sum())  # the probe finds every 'a' test word
    absorbed = int(((absorber >= 0) & test).sum())
    assert absorbed >= 15
    if planted:
        assert a["n_absorbed"] == absorbed  # exactly the planted words, no others
        assert a["full_absorption_rate"] == pytest.approx(absorbed / a["n_true_positives"])
        assert a["absorption_fraction"] == pytest.approx(a["full_absorption_rate"])
        lo, hi = a["full_absorption_rate_ci95"]
        assert 0 < lo < a["full_absorption_rate"] < hi
    else:
        assert a["n_absorbed"] == 0 and a["full_absorption_rate"] == 0 and a["absorption_fraction"] == 0
    for c in "bc":
        assert res["letters"][c]["full_absorption_rate"] == 0 and res["letters"][c]["absorption_fraction"] == 0
    assert res["full_absorption_rate"] == pytest.approx(a["full_absorption_rate"] / 3)
    assert res["full_absorption_rate_ci95"][0] <= res["full_absorption_rate"] <= res["full_absorption_rate_ci95"][1]


def test_word_activations_through_the_cached_prefix_equal_full_prompts():
    from sae.probe_data import word_activations
    from tests.tiny_models import tiny_model
    model = tiny_model("llama")
    prefix, words = [1, 5, 9, 17, 33, 2], list(range(40, 90))
    got = word_activations(model, prefix, words, "layers.1.resid_post", batch=16)
    from collect.hooks import forward_to
    ids = torch.tensor([[*prefix, w] for w in words])
    want = forward_to(model, ids, ["layers.1.resid_post"])["layers.1.resid_post"][:, -1].numpy()
    assert got.shape == (50, 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _Tok:
    """A tokenizer stand-in with a small vocabulary."""
    vocab = ["<s>", " cat", "Dog", " 42", "ab", " x y", "é", " Zebra"]

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_vocabulary_words_are_letters_with_an_optional_leading_space():
    assert vocabulary_words(_Tok()) == [(1, " cat"), (2, "Dog"), (4, "ab"), (7, " Zebra")]
