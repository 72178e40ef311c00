"""Helpers around quantized models: list the clips, find bit-widths, load a higher-bit checkpoint."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from .functional import FULL_PRECISION
from .layers import QUANTIZER_PARAMS, QuantAct, QuantConv2d, QuantLinear


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model (names the offending keys)."""


def quant_params(model: nn.Module) -> dict:
    """Every learnable clip of the model: ``{qualified name: value}`` (like APoT's show_params)."""
    out = {}
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in QUANTIZER_PARAMS:
            out[name] = float(p.detach())
    return out


def show_params(model: nn.Module, printer=print) -> dict:
    """Print (and return) every activation clip ``act_alpha`` and weight clip ``wgt_alpha``."""
    params = quant_params(model)
    for name, v in params.items():
        printer(f"{name:60s} {v:.4f}")
    return params


def activation_bits(model: nn.Module) -> set:
    """Set of activation bit-widths used by the model's ``QuantAct`` modules."""
    return {m.bit for m in model.modules() if isinstance(m, QuantAct)}


def weight_bits(model: nn.Module) -> set:
    return {m.wbit for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict:
    """Remove a ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (torch.compile) prefix."""
    out = {}
    for k, v in state_dict.items():
        while True:
            for p in (prefix, "_orig_mod."):
                if k.startswith(p):
                    k = k[len(p):]
                    break
            else:
                break
        out[k] = v
    return out


def _is_quantizer_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in QUANTIZER_PARAMS


def load_init(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, reset_missing=True) -> dict:
    """Initialise ``model`` from a (higher-bit or float) checkpoint -- the ``--init`` semantics.

    * Missing quantizer parameters (``act_alpha`` / ``wgt_alpha``) are expected -- a float model has
      none -- and are (re)set to their initial value.
    * Quantizer parameters present in the checkpoint but absent from the model (loading a quantized
      checkpoint into a full-precision model) are ignored.
    * Any other missing or unexpected key, or a shape mismatch, raises
      :class:`CheckpointMismatchError` naming the keys.

    Returns ``{"missing_quantizer": [...], "ignored_quantizer": [...]}``.
    """
    sd = strip_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_missing = [k for k in missing if not _is_quantizer_key(k)]
    bad_unexpected = [k for k in unexpected if not _is_quantizer_key(k)]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if bad_missing:
        problems.append(f"missing keys {_short(bad_missing)}")
    if bad_unexpected:
        problems.append(f"unexpected keys {_short(bad_unexpected)}")
    if shape:
        problems.append(f"shape mismatch {_short(shape)}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the model: " + "; ".join(problems))
    to_load = {k: v for k, v in sd.items() if k in own}
    model.load_state_dict(to_load, strict=False)
    if reset_missing:
        modules = dict(model.named_modules())
        for k in missing:
            mod = modules.get(k.rsplit(".", 1)[0] if "." in k else "")
            if mod is not None and hasattr(mod, "reset_quantizer"):
                mod.reset_quantizer()
    return {"missing_quantizer": missing, "ignored_quantizer": [k for k in unexpected]}


def _short(keys, n=6):
    keys = list(keys)
    head = ", ".join(keys[:n])
    return f"[{head}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def is_full_precision(model: nn.Module) -> bool:
    bits = activation_bits(model)
    return not bits or bits == {FULL_PRECISION}


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm plausible running statistics and affine parameters (seeded) and return
    the model in eval mode. An untrained network's BN is the identity, so its activations die out or
    saturate; this keeps the spike trains of untrained test / benchmark models realistic."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.3)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.1)
    return model.eval()


def set_module(root: nn.Module, path: str, new: nn.Module):
    """Put ``new`` at the dotted submodule ``path`` of ``root``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def get_attr(root, target: str):
    """The dotted attribute ``target`` of ``root`` (an fx ``get_attr`` node's target)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
