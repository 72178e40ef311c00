"""Classification model zoo of Fast-SNN.

``get_model(arch, bit, wbit=None, num_classes=None, dataset=None, **kw)`` builds one of

* CIFAR-10 (32x32): ``alex``, ``vgg11``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
  ``resnet110``, ``resnet18`` (TET variant);
* ImageNet (224x224): ``alexnet``, ``vgg16``, ``vgg11``, ``resnet18``, ``resnet34``, and any other
  torchvision classification model (``mobilenet_v2``, ``resnet50``, ...) through :func:`quant.quantize`
  (:mod:`classification.models.torchvision_models`).

``bit`` is the activation bit-width (32 = ReLU). ``wbit=None`` picks the original's weight precision:
CIFAR alex / vgg11 / resnet20..110 quantize hidden weights at ``bit`` (float when bit is 32), CIFAR
resnet18 and all ImageNet models keep float hidden weights. First / last layers are 8-bit for CIFAR
alex / vgg11 / resnet20..110 and ImageNet alexnet / vgg16 / vgg11, float for the other ResNets.

Every model carries ``input_size`` (32 / 224), ``ft_bn_mode`` (``"frozen"`` for CIFAR alex / vgg11,
``"recalibrate"`` otherwise) and ``ft_weight_decay`` (5e-4 / 1e-4) for the SNN fine-tuner, and the
instance attributes ``arch``, ``dataset``, ``bit``, ``wbit``, ``num_classes``.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch.nn as nn

from common.backbones import VALID_BITS, check_model_bit
from common.pretrained import (TORCHVISION_ARCHS, load_state_dict_file, load_torchvision_weights,
                               pretrained_state_dict)
from quant.functional import FULL_PRECISION

from .plain import CifarAlexNet, CifarVGG11, ImageNetAlexNet, ImageNetVGG11, ImageNetVGG16, PlainNet
from . import torchvision_models
from .resnet import BasicBlock, CifarResNet, CifarResNet18, ImageNetResNet, ResNet

CIFAR_ARCHS = ("alex", "vgg11", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18")
IMAGENET_ARCHS = ("alexnet", "vgg16", "vgg11", "resnet18", "resnet34")
DATASETS = ("cifar", "imagenet")
DEFAULT_NUM_CLASSES = {"cifar": 10, "imagenet": 1000}

# name -> (builder, hidden weights quantized at `bit` by default, default activation alpha_init)
_REGISTRY: Dict[str, Dict[str, Tuple[object, bool, float]]] = {
    "cifar": {
        "alex": (CifarAlexNet, True, 8.0),
        "vgg11": (CifarVGG11, True, 8.0),
        "resnet20": (partial(CifarResNet, 20), True, 6.0),
        "resnet32": (partial(CifarResNet, 32), True, 6.0),
        "resnet44": (partial(CifarResNet, 44), True, 6.0),
        "resnet56": (partial(CifarResNet, 56), True, 6.0),
        "resnet110": (partial(CifarResNet, 110), True, 6.0),
        "resnet18": (CifarResNet18, False, 6.0),
    },
    "imagenet": {
        "alexnet": (ImageNetAlexNet, False, 6.0),
        "vgg16": (ImageNetVGG16, False, 6.0),
        "vgg11": (ImageNetVGG11, False, 6.0),
        "resnet18": (partial(ImageNetResNet, [2, 2, 2, 2]), False, 6.0),
        "resnet34": (partial(ImageNetResNet, [3, 4, 6, 3]), False, 6.0),
    },
}
assert tuple(_REGISTRY["cifar"]) == CIFAR_ARCHS and tuple(_REGISTRY["imagenet"]) == IMAGENET_ARCHS


def list_archs(dataset: Optional[str] = None) -> tuple:
    """Arch names of one family, or of both (CIFAR first, shared names once)."""
    if dataset is not None:
        return CIFAR_ARCHS if _check_dataset(dataset) == "cifar" else IMAGENET_ARCHS
    return CIFAR_ARCHS + tuple(a for a in IMAGENET_ARCHS if a not in CIFAR_ARCHS)


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: choose from {', '.join(DATASETS)}")
    return dataset


def resolve_arch(arch: str, dataset: Optional[str] = None) -> str:
    """The dataset family of ``arch``. ``dataset=None``: CIFAR when the name is a CIFAR arch (so
    ``vgg11`` / ``resnet18`` mean the CIFAR models), else ImageNet."""
    if dataset is not None:
        _check_dataset(dataset)
        if arch in _REGISTRY[dataset]:
            return dataset
        raise ValueError(f"unknown arch {arch!r}: choose from {', '.join(list_archs(dataset))} "
                         f"(dataset={dataset})")
    for ds in DATASETS:
        if arch in _REGISTRY[ds]:
            return ds
    raise ValueError(f"unknown arch {arch!r}: choose from {', '.join(list_archs())}")


def default_wbit(arch: str, bit: int, dataset: Optional[str] = None) -> int:
    """The original's hidden-weight bit-width for ``arch`` at activation bit ``bit``."""
    ds = resolve_arch(arch, dataset)
    return check_model_bit(bit) if _REGISTRY[ds][arch][1] else FULL_PRECISION


def get_model(arch: str, bit: int = FULL_PRECISION, wbit: Optional[int] = None,
              num_classes: Optional[int] = None, dataset: Optional[str] = None, *,
              alpha_init: Optional[float] = None, in_channels: int = 3) -> nn.Module:
    """Build ``arch`` with ``bit``-bit activations.

    ``wbit``: hidden-weight bits (``None``: the per-model default, see :func:`default_wbit`).
    ``num_classes``: ``None`` gives 10 (CIFAR) / 1000 (ImageNet). ``dataset``: ``"cifar"`` /
    ``"imagenet"``; ``None`` resolves the name, CIFAR first (:func:`resolve_arch`). ``alpha_init``:
    initial activation clip (default 8.0 for CIFAR alex / vgg11, 6.0 otherwise).
    """
    if dataset in (None, "imagenet") and torchvision_models.is_torchvision_arch(arch, list_archs()):
        bit = check_model_bit(bit, "bit")  # any other torchvision classifier, quantized (torchvision_models)
        wbit = FULL_PRECISION if wbit is None else check_model_bit(wbit, "wbit")
        ds, num_classes = "imagenet", DEFAULT_NUM_CLASSES["imagenet"] if num_classes is None else int(num_classes)
        model = torchvision_models.build(arch, bit, wbit, num_classes, alpha_init=alpha_init,
                                         in_channels=in_channels)
        model.arch, model.dataset, model.bit, model.wbit, model.num_classes = arch, ds, bit, wbit, num_classes
        return model
    ds = resolve_arch(arch, dataset)
    bit = check_model_bit(bit, "bit")
    builder, quant_weights, default_alpha = _REGISTRY[ds][arch]
    if wbit is None:
        wbit = bit if quant_weights else FULL_PRECISION
    wbit = check_model_bit(wbit, "wbit")
    if num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES[ds]
    if int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    model = builder(bit=bit, wbit=wbit, num_classes=int(num_classes), in_channels=int(in_channels),
                    alpha_init=float(default_alpha if alpha_init is None else alpha_init))
    model.arch, model.dataset, model.bit, model.wbit, model.num_classes = arch, ds, bit, wbit, int(num_classes)
    return model


__all__ = [
    "CIFAR_ARCHS", "IMAGENET_ARCHS", "DATASETS", "VALID_BITS", "TORCHVISION_ARCHS", "get_model",
    "list_archs", "resolve_arch", "default_wbit", "pretrained_state_dict", "load_torchvision_weights",
    "load_state_dict_file", "BasicBlock", "ResNet", "CifarResNet", "CifarResNet18", "ImageNetResNet",
    "PlainNet", "CifarAlexNet", "CifarVGG11", "ImageNetAlexNet", "ImageNetVGG16", "ImageNetVGG11",
]
