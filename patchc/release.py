"""``release_dense``: free the dense weights of the planned linears that have 2:4 tiles, keeping only
their packed form (inference only; ``patchc.compile(..., release_dense=True)``).

The model stays usable: a released linear called outside a compiled graph computes from its
packed form (its weight is unpacked for the call and dropped), and ``state_dict()`` /
``save_pretrained()`` return W ⊙ M for it, never the zeros the freed storage reads as.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from . import runtime
from .modules import is_transposed, param_owners

log = logging.getLogger("patchc")


def _materialize(module: nn.Module, _args):
    """Forward pre-hook of a released linear run eagerly: the weight's values for this call."""
    if torch.compiler.is_compiling():          # a compiled graph calls the patchc op instead
        return
    w = module.weight
    e = runtime.released_entry(w)
    if e is not None:
        module._patchc_zero = w.data
        w.data = e.member_weight(0, w)


def _drop(module: nn.Module, _args, _out):
    """Forward hook: the weight goes back to the freed stride-0 view after the eager call."""
    if torch.compiler.is_compiling():
        return
    zero = module.__dict__.pop("_patchc_zero", None)
    if zero is not None:
        module.weight.data = zero


def _state_dict_values(module: nn.Module, state_dict, prefix, _local_metadata):
    """state_dict hook: W ⊙ M for a released weight (its storage holds no values)."""
    e = runtime.released_entry(module.weight)
    key = prefix + "weight"
    if e is not None and key in state_dict:
        state_dict[key] = e.member_weight(0, module.weight).detach()
    return state_dict


def release_dense(model: nn.Module, plan, cfg) -> int:
    """Pack every planned weight that has 2:4 tiles and free its dense storage.  Tied weights (used
    by another module, e.g. an embedding) are kept.  Returns the bytes freed."""
    from patchc.passes.plan_cache import plan_for
    owners = param_owners(model)
    mods = dict(model.named_modules())
    freed = 0
    for name, tm in plan.items():
        mod = mods[name]
        w = mod.weight
        if tm.num_sparse_tiles() == 0 or runtime.released_entry(w) is not None:
            continue
        if len(owners.get(id(w), [])) > 1:
            log.warning("patchc: release_dense keeps %s: its weight is shared with %s", name, owners[id(w)])
            continue
        entry = runtime.entry_for([w], [tm], [is_transposed(mod)], [name], [getattr(mod, "bias", None) is not None])
        entry.kernel = cfg.kernel
        entry.row_order = plan_for(tm, w.dtype, cfg.device, cfg.m_max, cfg.cache_dir).row_order
        if w.requires_grad:
            w.requires_grad_(False)
            log.info("patchc: release_dense froze %s (its dense weight is gone)", name)
        freed += w.numel() * w.element_size()
        entry.release(w)
        mod.register_forward_pre_hook(_materialize)
        mod.register_forward_hook(_drop)
        mod._register_state_dict_hook(_state_dict_values)
    log.info("patchc: release_dense freed %.1f MiB of dense weights", freed / 2**20)
    return freed
