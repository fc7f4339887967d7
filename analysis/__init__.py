"""Analysis on top of stores and SAEs: feature statistics and labels, the viewer and its server, explanations,
vocabulary and gradient search, latent and layer alignment, steering directions and steered generation, logit lens and activation patching.

    from analysis import actadd, steer, logit_lens
    sv = actadd(model, tokenizer, ["Love"], ["Hate"], "layers.4.resid_post", ["layers.6.resid_post"])
    with steer(model, sv, coeff=0.5):
        out = model.generate(ids, max_new_tokens=20)
"""
from saeforge.lazy import lazy_exports

_EXPORTS = {
    "feature_stats": "analysis.features", "load_features": "analysis.features_io", "write_features": "analysis.features_io",
    "load_index": "analysis.features_io", "load_latent": "analysis.features_io", "Reader": "analysis.features_io",
    "logit_table": "analysis.labels", "install_viewer": "analysis.dashboard",
    "explain_latents": "analysis.explain", "make_server": "analysis.serve",
    "complete_search": "analysis.vocab_search", "greedy_search": "analysis.vocab_search",
    "gradient_search": "analysis.grad_search",
    "Objective": "analysis.vocab_search", "align": "analysis.align",
    "SteeringVector": "analysis.directions", "actadd": "analysis.directions", "caa": "analysis.directions",
    "from_sae": "analysis.directions",
    "steer": "analysis.steer_apply", "generate": "analysis.steer_eval", "sweep": "analysis.steer_eval",
    "save_safetensors": "analysis.steer_files", "load_safetensors": "analysis.steer_files",
    "save_gguf": "analysis.steer_files",
    "logit_lens": "analysis.lens", "activation_patching": "analysis.patching",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
