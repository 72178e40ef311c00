"""CIFAR-10 (and CIFAR-100 / Fashion-MNIST / image-folder) scripts: main.py, snn.py, snn_ft.py."""
