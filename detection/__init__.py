"""Object detection with Fast-SNN: quantized YOLOv2 (tiny / ResNet-34) on VOC, COCO or the offline
scene set, converted to spiking networks.

Modules: :mod:`~detection.models` (the detectors), :mod:`~detection.boxes` (decoding, NMS),
:mod:`~detection.loss` (YOLOv2 targets and loss), :mod:`~detection.data` (VOC / COCO loaders with
transforms v2), :mod:`~detection.metrics` (VOC AP, COCOeval, the pipeline metric),
:mod:`~detection.workflow` (what the scripts ``train.py``, ``eval.py``, ``snn_ft.py``, ``demo.py`` run).
"""
