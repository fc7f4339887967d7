"""The one command-line/TOML config layer (saeforge.config): types, choices, positionals, help, errors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from saeforge.config import option, parse_config
from saeforge.errors import UserError


@dataclass
class Demo:
    sae: str = option("", "an SAE directory", positional=True)
    mode: Literal["add", "ablate"] = option("add", "what to do")
    arch: list[str] = option(["topk"], "architectures", choices=["topk", "relu"])
    k: list[int] = option([32], "active latents")
    lr: float | None = option(None, "learning rate")
    quiet: bool = option(False, "no bars")


def parse(argv, toml=None):
    cfg, _ = parse_config(Demo, argv, section="demo", prog="demo")
    return cfg


def test_flags_positionals_and_types():
    cfg = parse(["runs/sae", "--mode", "ablate", "--arch", "topk,relu", "--k", "16,1e2", "--lr", "3e-4", "--quiet"])
    assert (cfg.sae, cfg.mode, cfg.arch, cfg.k, cfg.lr, cfg.quiet) == ("runs/sae", "ablate", ["topk", "relu"],
                                                                       [16, 100], 3e-4, True)
    assert parse(["--sae", "x"]).sae == "x"


def test_toml_layer_under_flags(tmp_path):
    t = tmp_path / "run.toml"
    t.write_text('[demo]\nmode = "ablate"\nk = [8, 16]\n')
    cfg = parse([str(t), "d", "--k", "4"])
    assert (cfg.mode, cfg.k, cfg.sae) == ("ablate", [4], "d")


@pytest.mark.parametrize("argv,msg", [
    (["--mode", "steer"], "--mode 'steer' is not known; use one of add, ablate"),
    (["--arch", "topk,gated"], "--arch 'gated' is not known; use one of topk, relu"),
    (["--k", "many"], "--k: cannot read 'many' as int"),
    (["a", "--sae", "b"], "given twice"),
])
def test_bad_values_are_one_line(argv, msg):
    with pytest.raises(UserError, match=msg):
        parse(argv)


def test_toml_values_are_checked_like_flags(tmp_path):
    t = tmp_path / "bad.toml"
    t.write_text('[demo]\nmode = "steer"\n')
    with pytest.raises(UserError, match="--mode 'steer' is not known"):
        parse([str(t)])
    t.write_text('[demo]\nmood = "add"\n')
    with pytest.raises(UserError, match=r"unknown config key\(s\) \['mood'\]"):
        parse([str(t)])
    t.write_bytes(b'[demo]\nmode = "\xff"\n')
    with pytest.raises(UserError, match="is not UTF-8"):
        parse([str(t)])


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    assert "{add,ablate}" in out and "(default: add)" in out and "(default: topk)" in out and "(default: 32)" in out
    assert "SAE" in out.split("\n")[0]


def test_every_shipped_run_config_parses_with_the_real_config_classes():
    """configs/*.toml: each [collect] and [train] section builds and validates CollectConfig /
    TrainConfig (unknown keys, bad types and bad choices are errors), and the GPU configs ask for
    CUDA, bf16 and 65k-latent TopK SAEs with a lane count that splits over 8 ranks."""
    from pathlib import Path

    from collect.collector import CollectConfig
    from sae.config import TrainConfig, sweep_members
    from saeforge.config import build_config, load_toml_section
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert len(configs) >= 3
    d_model = {"llama-3.2-1b-gpu": 2048, "gemma-2-2b-gpu": 2304}
    for path in configs:
        c = build_config(CollectConfig, load_toml_section(path, "collect"), {})
        t = build_config(TrainConfig, load_toml_section(path, "train"), {})
        assert t.store == c.out and t.hook in c.hooks, path
        if path.stem in d_model:
            assert c.device == t.device == "cuda" and t.dtype == c.model_dtype == "bfloat16", path
            (member,) = sweep_members(t, d_model[path.stem])
            assert 64_000 <= member.arch.d_sae <= 65_536 and member.arch.k == 64, path
            assert t.data_lanes % 8 == 0 and t.batch_size % t.data_lanes == 0, path
    assert set(d_model) <= {p.stem for p in configs}
