"""Sparse dictionaries: architectures, the shuffled loader, the trainer, evaluation and the SAE
directory format.

    from sae import TrainConfig, train, load_sae, EvalConfig, run_eval
    res = train(TrainConfig(store="runs/quickstart/store.zarr", out="runs/sae"))
    sae = load_sae("runs/sae")            # takes raw activations
"""
from saeforge.lazy import lazy_exports

_EXPORTS = {
    "ARCHITECTURES": "sae.architectures", "ArchConfig": "sae.architectures", "SAE": "sae.architectures",
    "build_sae": "sae.architectures",
    "TrainConfig": "sae.config", "train": "sae.trainer", "Trainer": "sae.trainer",
    "load_sae": "sae.io", "save_sae": "sae.io", "read_cfg": "sae.io",
    "EvalConfig": "sae.eval_run", "run_eval": "sae.eval_run",
    "evaluate_sae": "sae.evaluate", "evaluate_rows": "sae.evaluate",
    "export_saelens": "sae.export_saelens",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
