"""The `saeforge train` config: one dataclass, TOML section [train] < command-line flags.

A sweep is written with list values (`--k 16,32 --expansion 8,16`, or `k = [16, 32]` in TOML):
every combination of arch × k × expansion × optimizer × lr × seed is trained from one pass over the data.
Seed replicas (`--seed 0,1,2`) differ in initialisation; they share the data order of the first seed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from sae.architectures import ARCHITECTURES, TOPK_FAMILY, TRANSCODER_ARCHS, ArchConfig
from sae.optim import OptimizerName, default_lr
from sae.wandb_log import WandbMode
from saeforge.config import check_choices, option
from saeforge.devices import check_device
from saeforge.errors import UserError

# fields that may change between an interrupted run and its --resume (they do not affect weights)
RESUMABLE_CHANGES = frozenset({"resume", "quiet", "wandb", "wandb_project", "device", "threads",
                               "checkpoint_every", "log_every", "eval_every", "eval_rows", "eval_ce_tokens",
                               "buffer_rows"})


@dataclass
class TrainConfig:
    store: str = option("", "activation store (.zarr) written by `saeforge collect`")
    hook: str = option("", "hook point to train on (default: the store's only hook); a transcoder's input")
    target: str = option("", "transcoder: the hook point to predict from --hook (e.g. layers.8.mlp_out with --hook "
                             "layers.8.mlp_in); empty: an autoencoder of --hook")
    skip: bool = option(False, "transcoder: add a learned linear skip term x·W_skipᵀ (skip-transcoder)")
    hooks: list[str] = option([], "crosscoder (--arch crosscoder): the hook points one shared code reads and "
                                  "reconstructs, e.g. layers.4.resid_post,layers.8.resid_post")
    matryoshka_groups: list[float] = option([0.0625, 0.0625, 0.125, 0.25, 0.5],
                                            "matryoshka: nested group sizes as fractions of d_sae (sum 1); the "
                                            "default makes prefixes of 1/16, 1/8, 1/4, 1/2 and all of it")
    out: str = option("sae_out", "output SAE directory (one sub-directory per SAE in a sweep)")
    arch: list[str] = option(["topk"], "architecture(s); a list makes a sweep", choices=list(ARCHITECTURES))
    k: list[int] = option([32], "active latents per token (topk, batchtopk, matryoshka, crosscoder); a list makes a sweep")
    expansion: list[int] = option([8], "d_sae = expansion × d_in; a list makes a sweep")
    optimizer: list[OptimizerName] = option(["signum-schedulefree"], "optimizer(s); a list makes a sweep")
    lr: list[float] = option([], "learning rate(s); default per optimizer: base/sqrt(d_sae/16384) (sae/optim.py)")
    momentum: float = option(0.95, "signum-schedulefree: schedule-free interpolation momentum β")
    bias_lr_scale: float = option(0.01, "lr of b_enc and b_dec = this × --lr (biases live in input units)")
    tokens: int = option(2_000_000, "training tokens")
    batch_size: int = option(4096, "tokens per step")
    seed: list[int] = option([0], "seed(s) for initialisation (a list trains seed replicas in one pass); the first "
                                  "also orders the data")
    device: str = option("cpu", "cpu or cuda[:i]")
    threads: int = option(0, "torch CPU threads (0: leave torch's default)")
    resume: bool = option(False, "continue the interrupted run in --out exactly")
    quiet: bool = option(False, "no progress bar")
    wandb: WandbMode = option("offline", "wandb mode: online, offline (runs land in ./wandb) or disabled")
    wandb_project: str = option("saeforge", "wandb project")
    checkpoint_every: int = option(1_000_000, "tokens between checkpoints (0: only on interrupt)")
    dead_tokens: int = option(0, "a latent is dead after this many tokens without firing (AuxK); "
                             "0: 20,000, or a tenth of --tokens in runs under 200k")
    warmup_steps: int | None = option(None, "linear lr warm-up steps, capped at a tenth of the run "
                                  "(default: 1000 for adam, 0 for schedule-free)")
    decay_fraction: float | None = option(None, "linear lr decay to 0 over this final fraction of steps "
                                      "(default: 0.2 for adam, 0 for schedule-free)")
    grad_clip: float = option(1.0, "gradient norm clip (0: off)")
    aux_k: int = option(0, "AuxK latents (0: d_in/2)")
    aux_coef: float = option(1 / 32, "AuxK loss coefficient")
    l1_coef: float = option(5.0, "relu: L1 coefficient (L1 weighted by decoder norm)")
    l0_coef: float = option(1e-3, "jumprelu: L0 coefficient")
    scale_sample: int = option(65536, "rows used to estimate the input scale and b_dec")
    init_b_dec: Literal["median", "mean"] = option("mean", "b_dec initialisation: mean or (geometric) median")
    init_enc_scale: float = option(0.577, "encoder rows start at this × their (unit-norm) decoder rows "
                                      "(0.577 = nn.Linear's row norm)")
    buffer_rows: int = option(1 << 17, "rows in the in-RAM shuffle buffer")
    data_lanes: int = option(1, "independent chunk streams that make up each batch (sae/loader.py); under "
                             "torchrun a multiple of the rank count lets each rank read only its share")
    shard_latents: int = option(1, "split each SAE's latents across this many ranks (torchrun; --arch topk): "
                                   "ranks = data-parallel ranks × this, see sae/sharded.py")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "SAE forward/backward compute dtype (autocast; weights and optimizer stay float32)")
    log_every: int = option(10, "steps between wandb metric logs")
    eval_every: int = option(200, "steps between held-out evaluations and latent-density histograms")
    eval_rows: int = option(8192, "held-out rows for evaluation")
    eval_ce_tokens: int = option(0, "tokens for the final CE/KL evaluation with the SAE spliced in (0: skip; loads the model)")

    def validate(self) -> None:
        check_choices(self)
        if not self.store:
            raise UserError("no store given; pass --store PATH.zarr (written by `saeforge collect`)")
        if not self.arch or not self.k or not self.expansion or not self.seed:
            raise UserError("--arch, --k, --expansion and --seed need at least one value")
        for name in ("k", "expansion"):
            for v in getattr(self, name):
                if v < 1:
                    raise UserError(f"--{name} {v} must be a positive integer")
        if not self.optimizer:
            raise UserError("--optimizer needs at least one value")
        if not 0 < self.momentum < 1:
            raise UserError(f"--momentum {self.momentum} must be in (0, 1), e.g. 0.95")
        for v in self.lr:
            if not 0 < v < 1:
                raise UserError(f"--lr {v} is out of range; use e.g. 2e-4")
        if self.batch_size < 2:
            raise UserError(f"--batch-size {self.batch_size} must be at least 2")
        if self.tokens < self.batch_size:
            raise UserError(f"--tokens {self.tokens} is less than one batch (--batch-size {self.batch_size})")
        if self.eval_ce_tokens < 0:
            raise UserError(f"--eval-ce-tokens {self.eval_ce_tokens} must be >= 0")
        if self.decay_fraction is not None and not 0 <= self.decay_fraction <= 1:
            raise UserError(f"--decay-fraction {self.decay_fraction} must be in [0, 1]")
        if self.data_lanes < 1 or self.batch_size % self.data_lanes:
            raise UserError(f"--data-lanes {self.data_lanes} must be a positive divisor of --batch-size "
                            f"{self.batch_size}")
        if self.dtype == "float16" and set(self.arch) - set(TOPK_FAMILY):
            raise UserError(f"--dtype float16 needs a loss scaler for --arch {','.join(self.arch)} (its backward "
                            f"runs in float16); use --dtype bfloat16")
        self._validate_kind()
        self._validate_sharding()
        check_device(self.device)

    def _validate_sharding(self) -> None:
        """What --shard-latents can split (the rank count is checked when the process group exists)."""
        n = self.shard_latents
        if n < 1:
            raise UserError(f"--shard-latents {n} must be a positive number of ranks (1: no sharding)")
        if n == 1:
            return
        if set(self.arch) != {"topk"} or self.target or self.hooks:
            raise UserError(f"--shard-latents splits TopK autoencoders (--arch topk, no --target or --hooks); "
                            f"got --arch {','.join(self.arch)}" + (" with --target" if self.target else "")
                            + (" with --hooks" if self.hooks else ""))
        if self.dtype != "float32":
            raise UserError("--shard-latents trains in float32; drop --dtype")

    def _validate_kind(self) -> None:
        """Which dictionary kind the hook flags ask for, and whether --arch fits it."""
        archs = set(self.arch)
        if self.skip and not self.target:
            raise UserError("--skip adds the skip term of a skip-transcoder; it needs --target HOOK (the hook point "
                            "to predict from --hook), e.g. --hook layers.8.mlp_in --target layers.8.mlp_out")
        if self.target:
            if self.hooks:
                raise UserError("--target (a transcoder) and --hooks (a crosscoder) cannot be combined; give one")
            bad = sorted(archs - set(TRANSCODER_ARCHS))
            if bad:
                raise UserError(f"--target trains transcoders, which need a TopK-family --arch "
                                f"({', '.join(TRANSCODER_ARCHS)}); got {', '.join(bad)}")
            if self.target == self.hook:
                raise UserError(f"--target {self.target} equals --hook; drop --target to train an autoencoder")
        if "crosscoder" in archs:
            if len(archs) > 1:
                raise UserError("--arch crosscoder trains on several hook points; sweep it alone "
                                "(not with " + ", ".join(sorted(archs - {"crosscoder"})) + ")")
            if len(dict.fromkeys(self.hooks)) < 2:
                raise UserError("--arch crosscoder needs --hooks with at least two hook points, e.g. "
                                "--hooks layers.4.resid_post,layers.8.resid_post")
            if self.hook:
                raise UserError("--arch crosscoder reads --hooks; drop --hook")
        elif self.hooks:
            raise UserError("--hooks lists the hook points of a crosscoder; add --arch crosscoder (or train an SAE "
                            "with --hook HOOK)")
        if "matryoshka" in archs:
            g = self.matryoshka_groups
            if not g or any(v <= 0 for v in g) or abs(sum(g) - 1) > 1e-6:
                raise UserError(f"--matryoshka-groups {','.join(f'{v:g}' for v in g)} must be positive fractions "
                                f"of d_sae summing to 1, e.g. 0.25,0.25,0.5")

    @property
    def input_hooks(self) -> list[str]:
        """Hook points the dictionaries read (concatenated in this order)."""
        return list(dict.fromkeys(self.hooks)) if self.hooks else [self.hook]

    @property
    def data_hooks(self) -> list[str]:
        """Hook points the loader reads per row: the inputs, then a transcoder's target."""
        return self.input_hooks + ([self.target] if self.target else [])

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def dead_after(self) -> int:
        """Tokens without firing after which a latent counts as dead (AuxK trains it). 20k (≈ 5 batches of
        4096) keeps < 0.4% of latents dead at 200k–1.2M tokens where a tenth of the run leaves 3–7%
        (bench/quality.py, README); short runs use a tenth so AuxK still engages."""
        return self.dead_tokens or min(20_000, max(self.tokens // 10, 1))

    @property
    def data_seed(self) -> int:
        """The seed of the data order and input-scale sample (shared by every SAE of the pass)."""
        return self.seed[0]


@dataclass
class SweepMember:
    """One SAE of a (possibly one-element) sweep."""
    name: str
    arch: ArchConfig
    lr: float
    optimizer: str = "adam"
    seed: int = 0
    init_seed: int = 0  # the weights' generator seed: seed · 1000 + the index of the arch × k × expansion × optimizer × lr combination


def sweep_members(cfg: TrainConfig, d_in: int) -> list[SweepMember]:
    """Every distinct arch × k × expansion × optimizer × lr × seed combination (k is ignored for relu/jumprelu).

    A seed replica starts from the weights a run with that seed alone starts from (same init_seed)."""
    out: list[SweepMember] = []
    seen: set[tuple] = set()
    lrs: list[float | None] = list(cfg.lr) or [None]
    opts = list(dict.fromkeys(cfg.optimizer))
    seeds = list(dict.fromkeys(cfg.seed))
    index = 0
    n_layers = len(cfg.input_hooks)
    for arch, k, exp, opt, lr in itertools.product(cfg.arch, cfg.k, cfg.expansion, opts, lrs):
        uses_k = arch in TOPK_FAMILY
        key = (arch, k if uses_k else None, exp, opt, lr)
        if key in seen:
            continue
        seen.add(key)
        d_sae = exp * d_in
        a = ArchConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k if uses_k else 0, aux_k=cfg.aux_k or d_in // 2,
                       aux_coef=cfg.aux_coef, l1_coef=cfg.l1_coef, l0_coef=cfg.l0_coef,
                       transcoder=bool(cfg.target), skip=cfg.skip, n_layers=n_layers,
                       group_sizes=group_sizes(cfg.matryoshka_groups, d_sae) if arch == "matryoshka" else None)
        real_lr = default_lr(opt, d_sae) if lr is None else lr
        name = (f"{arch}" + (f"_k{k}" if uses_k else "") + f"_x{exp}" + (f"_{opt}" if len(opts) > 1 else "")
                + (f"_lr{lr:g}" if len(lrs) > 1 else ""))
        for seed in seeds:
            out.append(SweepMember(name + (f"_s{seed}" if len(seeds) > 1 else ""), a, real_lr, opt, seed,
                                   seed * 1000 + index))
        index += 1
    return out


def group_sizes(fractions: list[float], d_sae: int) -> list[int]:
    """Latents per Matryoshka group: round(f·d_sae) for all but the last, which takes the rest."""
    sizes = [max(1, round(f * d_sae)) for f in fractions[:-1]]
    rest = d_sae - sum(sizes)
    if rest < 1:
        raise UserError(f"--matryoshka-groups leave no latents for the last group at d_sae {d_sae}; use fewer or "
                        f"larger groups")
    return sizes + [rest]
