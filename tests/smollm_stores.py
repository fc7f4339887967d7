"""Small SmolLM2 stores of wikitext-2 paragraphs (headings dropped), collected in-process for tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def paragraph_store(smollm2: Any, wikitext_dir: Path, tmp: Path, hooks: list[str], chars: int, max_tokens: int,
                    heldout_fraction: float) -> Any:
    """The first `chars` characters of valid.txt without `= heading =` lines, collected at `hooks`
    (context 64) into tmp/s.zarr with the session's already-loaded model."""
    from collect.collector import CollectConfig, collect_activations
    text = (wikitext_dir / "valid.txt").read_text()[:chars]
    (tmp / "paras.txt").write_text("\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("=")))
    return collect_activations(CollectConfig(corpus=str(tmp / "paras.txt"), hooks=hooks, context=64,
                                             max_tokens=max_tokens, heldout_fraction=heldout_fraction, shard_rows=256,
                                             out=str(tmp / "s.zarr"), quiet=True), loaded=smollm2)
