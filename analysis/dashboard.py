"""The static viewer of a features directory: HTML + JS + CSS, no network, no CDN.

`analysis/viewer/` holds the viewer; `install_viewer(DIR)` copies it into a features directory,
beside the data that `saeforge features` wrote (data/index.js, data/vocab.js, data/shards/*.js)
and the explanations `saeforge explain` adds (data/explanations.js). Open DIR/index.html from
disk, or run `saeforge serve DIR` for the live endpoints too.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import logging

from analysis.features_io import DATA, fingerprint, js_call, load_features, write_text_file
from saeforge.urls import read_json

log = logging.getLogger(__name__)

ASSETS = ("index.html", "viewer.js", "viewer.css")
EXPLANATIONS_JS = f"{DATA}/explanations.js"
EXPLANATIONS = "explanations.json"
EXPLANATIONS_FORMAT = "saeforge-explanations"


def viewer_asset(name: str) -> bytes:
    """One file of the packaged viewer."""
    return resources.files("analysis").joinpath("viewer", name).read_bytes()


def install_viewer(out: str | os.PathLike[str]) -> Path:
    """Copy the viewer into a features directory (checked first); returns DIR/index.html."""
    out = Path(out)
    load_features(out)
    for name in ASSETS:
        tmp = out / f"{name}.tmp{os.getpid()}"
        tmp.write_bytes(viewer_asset(name))
        os.replace(tmp, out / name)
    refresh_explanations(out)
    return out / "index.html"


def refresh_explanations(out: str | os.PathLike[str]) -> int:
    """data/explanations.js from DIR/explanations.json when that belongs to this data (same
    fingerprint), else an empty one; returns the number of explained latents shown."""
    out = Path(out)
    doc, records = load_features(out), []
    f = out / EXPLANATIONS
    meta: dict[str, Any] = {}
    if f.is_file():
        ex = read_json(str(f), "explanations file")
        if ex.get("features_fingerprint") == fingerprint(doc):
            records = ex.get("latents", [])
            meta = {k: ex.get(k) for k in ("explainer", "scorer", "method")}
        else:
            log.warning("%s was made for other feature data (the SAE, store or example settings changed); the viewer "
                        "does not show it: rerun `saeforge explain %s --overwrite`", f, out)
    if records:
        write_explanations_js(out, records, meta)
    else:
        write_text_file(out / EXPLANATIONS_JS, js_call("explanations", None))
    return len(records)


def write_explanations_js(out: str | os.PathLike[str], records: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """data/explanations.js for the viewer: one column per field over the explained latents."""
    cols = {"latents": [r["latent"] for r in records], "explanation": [r["explanation"] for r in records],
            "score": [r["score"] for r in records], "label_score": [r["label_score"] for r in records]}
    path = Path(out) / EXPLANATIONS_JS
    write_text_file(path, js_call("explanations", {**meta, **cols}))
    return path
