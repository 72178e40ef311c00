"""Pretrained weights for the ImageNet ResNets (torchvision) and local checkpoint files, for every task
whose backbone can start from them (the classifiers, DeepLabV3-ResNet34's ``--init torchvision``)."""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn

import quant

#: architectures whose parameter names and shapes match torchvision's (ImageNet only)
TORCHVISION_ARCHS = ("resnet18", "resnet34")
TORCHVISION_TAG = "IMAGENET1K_V1"


def _unwrap(obj, path: str) -> dict:
    """A raw state dict, or the ``state_dict`` / ``model`` entry of a checkpoint dict."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(f"{path}: not a state dict (expected a dict of tensors, or a dict with a "
                     "'state_dict' or 'model' entry)")


def load_state_dict_file(path: str) -> dict:
    """``torch.load(path, weights_only=True)`` on CPU, unwrapped to a plain state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap(obj, path)


def pretrained_state_dict(arch: str, source: str = "torchvision", *, dataset: str = "imagenet") -> dict:
    """A state dict to initialise ``arch`` from.

    ``source="torchvision"``: the torchvision ImageNet weights (``IMAGENET1K_V1``) of ``resnet18`` /
    ``resnet34`` -- downloaded, so online only (a failure raises ``RuntimeError``). Any other
    ``source`` is a local file path (a raw state dict, or a dict with a ``state_dict`` / ``model``
    entry), for any arch. Load the result with :func:`load_torchvision_weights` or ``quant.load_init``.
    """
    if source != "torchvision":
        return load_state_dict_file(source)
    if dataset != "imagenet" or arch not in TORCHVISION_ARCHS:
        raise ValueError(
            f"torchvision weights do not fit the Fast-SNN {dataset} {arch} (its architecture differs from "
            f"torchvision's: stride-2 convs, BN, no max-pool); only ImageNet "
            f"{' / '.join(TORCHVISION_ARCHS)} can start from them -- pass a local state-dict file instead")
    try:
        import torchvision
        weights = torchvision.models.get_model_weights(arch)[TORCHVISION_TAG]
        sd = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False,
                                                check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - offline, proxy, hash, missing torchvision...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RuntimeError(f"could not fetch torchvision {arch} {TORCHVISION_TAG} weights "
                           f"({type(e).__name__}: {msg}); pass a local state-dict file instead") from e
    return _unwrap(sd, f"torchvision {arch}")


def load_torchvision_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Load a torchvision-named state dict (conv / BN / fc) into ``model``; the quantizer clips
    (``act_alpha`` / ``wgt_alpha``), absent from it, are set to their initial values.

    Strict otherwise: a missing / unexpected non-quantizer key or a shape mismatch raises
    ``quant.CheckpointMismatchError``. Returns ``quant.load_init``'s report.
    """
    return quant.load_init(model, state_dict)


__all__ = ["TORCHVISION_ARCHS", "load_state_dict_file", "pretrained_state_dict", "load_torchvision_weights"]
