"""Collection: load a model, find its hook points, run a corpus through it and shard the
activations into a Zarr store.

    from collect import CollectConfig, collect_activations, Store
    store = collect_activations(CollectConfig(corpus="python-docs", hooks=["layers.15.resid_post"]))
    x = Store.open("runs/quickstart/store.zarr").activations("layers.15.resid_post", 0, 4096)
"""
from saeforge.lazy import lazy_exports

_EXPORTS = {
    "CollectConfig": "collect.collector", "collect_activations": "collect.collector",
    "Store": "collect.store", "StoreWriter": "collect.store",
    "LoadedModel": "collect.model", "load_model": "collect.model",
    "discover_layout": "collect.layers", "resolve_hook_point": "collect.layers", "hook_point_names": "collect.layers",
    "capture": "collect.hooks", "hooks": "collect.hooks", "forward_to": "collect.hooks",
    "add_vector": "collect.hooks", "replace_with": "collect.hooks", "project_out": "collect.hooks",
    "load_documents": "collect.corpus", "pack_sequences": "collect.corpus",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
