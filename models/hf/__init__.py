"""Conversion between our `Llama` and stock Hugging Face transformers classes.

Pure functions on full (TP = 1) state dicts; no CLI and no torch.distributed here. One file per job:

    choose.py       which class a model exports to (or why none), and docs/interop.md's per-scheme table
    llama.py, qwen3.py, olmo2.py, gemma4.py    one `Target` per class: where its norms sit, its config's own fields
    convert.py      configs and state dicts, both ways, for every target
    linear_norm.py  ln_free in Llama: RMSNorms made linear (rms_norm_eps 2^40, gains 2^20)
    files.py        directories: `save_hf` (the files; pretrain/files.py publishes them), `load_hf_state`, `load_hf`
    common.py       key and shape checks, norm gains

Export: `pre_ln` and `lns` (1/sqrt(l) folded into the gains) -> LlamaForCausalLM, or with model.qk_norm=head ->
Qwen3ForCausalLM; `reordered` with model.qk_norm=full -> Olmo2ForCausalLM; `gemma4` -> Gemma4ForCausalLM (its sliding
window, per-layer inputs, softcap, MoE and KV sharing written off); `ln_free` -> LlamaForCausalLM with linear
norms and its multipliers folded. Zero-centred gains are folded as 1 + w. Anything else is refused with a one-line
`ValueError` that says why (models/hf/choose.py). Import dispatches on model_type (llama -> pre_ln, or ln_free when its
norms are linear; qwen3 -> pre_ln + qk_norm=head; olmo2 -> reordered + qk_norm=full; gemma4_text -> gemma4); `norm_scheme="lns"` divides each
block norm gain by 1/sqrt(l), the inverse of the export fold, so an exported lns model comes back as the same model.
"""

from __future__ import annotations

from models.hf.choose import TARGETS, NotExportable, export_reference, export_target
from models.hf.common import norm_output_scales
from models.hf.convert import check_exportable, from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from models.hf.files import BIN_NAME, SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, load_hf, load_hf_state, save_hf
from models.hf.linear_norm import LINEAR_EPS, LINEAR_GAIN

__all__ = [
    "to_hf_config",
    "to_hf_state_dict",
    "from_hf_config",
    "from_hf_state_dict",
    "save_hf",
    "load_hf",
    "load_hf_state",
    "check_exportable",
    "norm_output_scales",
    "export_target",
    "export_reference",
    "NotExportable",
    "TARGETS",
    "LINEAR_EPS",
    "LINEAR_GAIN",
    "SAFETENSORS_NAME",
    "SAFETENSORS_INDEX_NAME",
    "BIN_NAME",
]
