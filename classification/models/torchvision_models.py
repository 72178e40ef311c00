"""torchvision classification models for the ImageNet scripts, quantized with :func:`quant.quantize`.

``-a NAME`` takes any torchvision classification model name (``mobilenet_v2``, ``resnet50``,
``densenet121``, ...) besides the hand-written Fast-SNN models, which keep their names (``alexnet``,
``vgg16``, ``vgg11``, ``resnet18``, ``resnet34``). The torchvision model is built with random weights and
quantized: every ReLU / ReLU6 becomes a ``QuantAct(bit)``, conv / linear layers quantized weights
(hidden ones float by default, as every ImageNet model here; ``--wbit`` quantizes them), first / last
layers 8-bit, max-pools replaced by average pools of the same window. A model with a layer an IF neuron
cannot represent (SiLU, GELU, attention, ...) is a one-line error naming that layer. See
docs/own-network.md.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterator, Optional, Sequence

import torch.nn as nn

from quant.functional import FULL_PRECISION

#: ImageNet crop size of the torchvision models
INPUT_SIZE = 224
_REFUSED_HINT = "pick a model with ReLU / ReLU6 activations (mobilenet_v2, resnet50, densenet121, ...)"


def torchvision_names() -> tuple:
    """Every torchvision classification model name (sorted)."""
    import torchvision
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


class ArchChoices(Sequence):
    """The ``-a`` choices of the ImageNet scripts: the hand-written models first, then every other
    torchvision classification name (membership is checked without building anything)."""

    def __init__(self, own: Sequence[str]):
        self.own = tuple(own)
        self._all = None

    def _names(self) -> tuple:
        if self._all is None:
            self._all = self.own + tuple(n for n in torchvision_names() if n not in self.own)
        return self._all

    def __contains__(self, name) -> bool:
        return name in self.own or name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, i):
        return self._names()[i]


def is_torchvision_arch(arch: str, own: Sequence[str] = ()) -> bool:
    """``arch`` is a torchvision classification name that is not one of the hand-written ``own`` models."""
    return arch not in own and arch in torchvision_names()


def build(arch: str, bit: int, wbit: Optional[int] = None, num_classes: int = 1000, *,
          alpha_init: Optional[float] = None, in_channels: int = 3) -> nn.Module:
    """torchvision's ``arch`` (random weights) quantized at ``bit`` activation bits, hidden weights at
    ``wbit`` (``None``: float, the rule of every ImageNet model here), first / last layers 8-bit,
    max-pools as average pools (one log line names them). Carries the attributes the workflows read.
    Raises :class:`common.UserError` naming a layer with no IF equivalent."""
    import torchvision

    import quant
    from common import UserError
    from common.logger import log
    if in_channels != 3:
        raise ValueError(f"torchvision models take 3 input channels, not {in_channels}")
    wbit = FULL_PRECISION if wbit is None else wbit
    float_model = torchvision.models.get_model(arch, weights=None, num_classes=int(num_classes))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = quant.quantize(float_model, bit, wbit=wbit, maxpool="avg", alpha_init=alpha_init)
        except quant.UnsupportedLayerError as e:
            raise UserError(f"--arch {arch} cannot become a spiking network: {e}", _REFUSED_HINT) from None
    for w in caught:
        log(f"{arch}: {w.message}")
    model.input_size = INPUT_SIZE
    model.ft_bn_mode = "recalibrate"
    model.ft_weight_decay = 1e-4
    return model


def weights_file(arch: str) -> str:
    """Path of torchvision's default ImageNet weights of ``arch`` in the torch hub cache, fetched there
    when missing (online only). Raises :class:`common.UserError` when they cannot be had."""
    import torch
    import torchvision

    from common import UserError
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError) as e:
        raise UserError(f"torchvision has no pretrained weights for {arch} ({e})",
                        "pass --pretrained FILE (a state dict of this model)") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        try:
            torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False, check_hash=True,
                                               weights_only=True)
        except Exception as e:  # noqa: BLE001 - offline, proxy, hash...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"torchvision's {arch} weights ({weights}) are not in the torch hub cache {path} "
                            f"and could not be downloaded ({msg})",
                            "copy the file there, or pass --pretrained FILE (a local state dict)") from None
    return path


__all__ = ["INPUT_SIZE", "ArchChoices", "torchvision_names", "is_torchvision_arch", "build", "weights_file"]
