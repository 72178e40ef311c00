"""ImageNet scripts (DDP, DALI or torchvision input pipelines): dali_main.py, snn.py, snn_ft.py."""
