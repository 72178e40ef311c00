"""YOLOv2 detectors of Fast-SNN: ``yolov2_tiny`` and ``yolov2_r34``.

Float weights everywhere; every hidden conv is ``conv -> BN -> QuantAct`` (the QuantAct becomes an IF
neuron in the SNN); the prediction conv 1x1 is the non-spiking accumulator. No max-pool (stride-2
convs). Overall stride 32: a 416 x 416 input gives a 13 x 13 grid.

* ``yolov2_tiny``: 7 conv3x3 units with 16, 32, 64, 128, 256 channels (stride 2 each), then 512 and
  1024 (stride 1); head conv3x3 1024 -> 1024; pred conv1x1 -> A * (5 + C).
* ``yolov2_r34``: the project's ImageNet ResNet-34 (stride-4 7x7 stem, no max-pool; parameter names
  ``backbone.conv1``, ``backbone.layer1.0.conv1``, ... as torchvision's under ``backbone.``); head1 1x1
  512 -> 1024, head2 / head3 3x3; route: C4 (layer3, 256 ch, stride 16) -> 1x1 -> 128 -> reorg x2
  (space-to-depth, 512 ch) concatenated with head3 (1536 ch) -> head4 3x3 -> 1024 -> pred 1x1.

``width`` multiplies every channel count (1.0 = the paper's nets). ``forward`` returns the raw
prediction ``[B, H*W*A, 5 + C]`` with, per anchor, ``(tx, ty, tw, th, conf, class logits...)``;
decoding, scores and NMS are post-processing (:mod:`detection.boxes`), outside the model, so the net
is torch.fx traceable and the converter can place the SNN's read-out after ``pred``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from common.backbones import ConvBNAct, ResNet, check_model_bit
from quant.functional import FULL_PRECISION

VERSIONS = ("yolov2_tiny", "yolov2_r34")
STRIDE = 32
# anchor (w, h) in grid cells of the stride-32 map
VOC_ANCHORS = [[1.19, 1.98], [2.79, 4.59], [4.53, 8.92], [8.06, 5.29], [10.32, 10.65]]
COCO_ANCHORS = [[0.53, 0.79], [1.71, 2.36], [2.89, 6.44], [6.33, 3.79], [9.03, 9.74]]
NMS_THRESH = {"yolov2_tiny": 0.5, "yolov2_r34": 0.6}
CONF_THRESH = 0.001
DEFAULT_ALPHA = 6.0


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _unit(cin, cout, k, stride, bit, alpha_init):
    return ConvBNAct(cin, cout, k, stride, k // 2, bit=bit, wbit=FULL_PRECISION, alpha_init=alpha_init,
                     conv_cls=nn.Conv2d)


def flatten_prediction(pred: torch.Tensor, num_anchors: int, num_classes: int) -> torch.Tensor:
    """``[B, A*(5+C), H, W]`` -> ``[B, H*W*A, 5+C]`` (the usual YOLO reshape)."""
    B, abC, H, W = pred.size()
    pred = pred.permute(0, 2, 3, 1).contiguous().view(B, H * W, abC)
    return pred.view(B, H * W * num_anchors, 5 + num_classes)


class _Detector(nn.Module):
    stride = STRIDE
    input_size = 416
    ft_bn_mode = "recalibrate"
    ft_weight_decay = 5e-4

    def _init_pred(self, cin: int):
        A, C = self.num_anchors, self.num_classes
        self.pred = nn.Conv2d(cin, A * (5 + C), 1)
        # small weights, zero bias: sigmoid(conf) starts at 0.5, where the objectness MSE has its largest
        # gradient (a low prior such as 0.01 would flatten it and stall learning)
        nn.init.normal_(self.pred.weight, 0.0, 0.01)
        nn.init.zeros_(self.pred.bias)

    def _flat(self, p):
        return flatten_prediction(self.pred(p), self.num_anchors, self.num_classes)


class YOLOv2Tiny(_Detector):
    def __init__(self, num_classes: int, anchors: Sequence[Sequence[float]], bit: int = FULL_PRECISION,
                 width: float = 1.0, alpha_init: float = DEFAULT_ALPHA):
        super().__init__()
        self.num_classes, self.num_anchors = int(num_classes), len(anchors)
        layers, cin = [], 3
        for c, s in zip((16, 32, 64, 128, 256, 512, 1024), (2, 2, 2, 2, 2, 1, 1)):
            layers.append(_unit(cin, _ch(c, width), 3, s, bit, alpha_init))
            cin = _ch(c, width)
        self.backbone = nn.Sequential(*layers)
        self.head = _unit(cin, _ch(1024, width), 3, 1, bit, alpha_init)
        _init_convs(self)
        self._init_pred(_ch(1024, width))

    def forward(self, x):
        return self._flat(self.head(self.backbone(x)))


class YOLOv2R34(_Detector):
    def __init__(self, num_classes: int, anchors: Sequence[Sequence[float]], bit: int = FULL_PRECISION,
                 width: float = 1.0, alpha_init: float = DEFAULT_ALPHA):
        super().__init__()
        self.num_classes, self.num_anchors = int(num_classes), len(anchors)
        w = [_ch(c, width) for c in (64, 128, 256, 512)]
        self.backbone = ResNet([3, 4, 6, 3], w, [1, 2, 2, 2], stem_width=w[0], stem_kernel=7, stem_stride=4,
                               stem_padding=3, stem_cls=nn.Conv2d, fc_cls=nn.Linear, bit=bit,
                               wbit=FULL_PRECISION, alpha_init=alpha_init, num_classes=1)
        del self.backbone.fc, self.backbone.avgpool   # a feature extractor here
        c1024, c128 = _ch(1024, width), _ch(128, width)
        self.head1 = _unit(w[3], c1024, 1, 1, bit, alpha_init)
        self.head2 = _unit(c1024, c1024, 3, 1, bit, alpha_init)
        self.head3 = _unit(c1024, c1024, 3, 1, bit, alpha_init)
        self.route = _unit(w[2], c128, 1, 1, bit, alpha_init)
        self.reorg = nn.PixelUnshuffle(2)           # space-to-depth x2: [128, 2H, 2W] -> [512, H, W]
        self.head4 = _unit(c1024 + 4 * c128, c1024, 3, 1, bit, alpha_init)
        _init_convs(self.head1, self.head2, self.head3, self.route, self.head4)
        self._init_pred(c1024)

    def forward(self, x):
        b = self.backbone
        x = b.act1(b.bn1(b.conv1(x)))
        x = b.layer2(b.layer1(x))
        c4 = b.layer3(x)
        c5 = b.layer4(c4)
        p = self.head3(self.head2(self.head1(c5)))
        r = self.reorg(self.route(c4))
        p = self.head4(torch.cat([r, p], dim=1))
        return self._flat(p)


def _init_convs(*mods):
    for mod in mods:
        for m in mod.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def default_anchors(dataset: str) -> List[List[float]]:
    return [list(a) for a in (COCO_ANCHORS if dataset.startswith("coco") else VOC_ANCHORS)]


def get_model(version: str, num_classes: int, anchors: Optional[Sequence[Sequence[float]]] = None,
              bit: int = FULL_PRECISION, width: float = 1.0, alpha_init: Optional[float] = None) -> nn.Module:
    """Build a detector; ``anchors`` default to the VOC ones. Raises ``ValueError`` on bad arguments."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}: choose from {', '.join(VERSIONS)}")
    bit = check_model_bit(bit, "bit")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if not width > 0:
        raise ValueError(f"width={width!r} must be positive")
    anchors = [[float(a), float(b)] for a, b in (anchors or VOC_ANCHORS)]
    cls = YOLOv2Tiny if version == "yolov2_tiny" else YOLOv2R34
    model = cls(num_classes, anchors, bit, width, DEFAULT_ALPHA if alpha_init is None else float(alpha_init))
    model.version, model.bit, model.width, model.anchors = version, bit, float(width), anchors
    model.nms_thresh = NMS_THRESH[version]
    model.wbit = FULL_PRECISION
    return model


__all__ = ["VERSIONS", "STRIDE", "VOC_ANCHORS", "COCO_ANCHORS", "NMS_THRESH", "CONF_THRESH", "YOLOv2Tiny",
           "YOLOv2R34", "flatten_prediction", "default_anchors", "get_model"]
