"""Shared fixtures: tiny fake datasets in the real on-disk formats (no downloads)."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

CIFAR_TRAIN_PER_BATCH = 4   # x 5 batches = 20 training images
CIFAR_TEST = 8


def _pattern_images(n: int, labels, rng) -> np.ndarray:
    """uint8 [n, 3, 32, 32]: noise plus a class-dependent bright square (learnable in a few steps)."""
    img = rng.integers(0, 80, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, y in enumerate(labels):
        r, c = divmod(int(y) % 10, 4)
        img[i, int(y) % 3, 4 + 6 * r: 10 + 6 * r, 4 + 6 * c: 10 + 6 * c] = 255
    return img


def write_fake_cifar10(root: str, per_batch: int = CIFAR_TRAIN_PER_BATCH, n_test: int = CIFAR_TEST, seed: int = 0):
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` in CIFAR's pickle format."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def dump(name, n):
        labels = [int(v) for v in rng.integers(0, 10, n)]
        data = _pattern_images(n, labels, rng).reshape(n, -1)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)
    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", n_test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return root


def write_fake_image_folder(root: str, classes=("cat", "dog", "fish"), per_class=(4, 2), seed: int = 0):
    """``root/{train,val}/<class>/*`` with PNG and JPEG files of varied sizes and modes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for ci, c in enumerate(classes):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
                arr[..., ci % 3] = 255
                img = Image.fromarray(arr)
                if i % 2:
                    img.convert("L").save(os.path.join(d, f"{i}.jpg"))
                else:
                    img.save(os.path.join(d, f"{i}.png"))
    return root


def write_fake_fashion_mnist(folder: str, n_train: int = 12, n_test: int = 6, seed: int = 0, gz: bool = True):
    """The four idx files of (Fashion-)MNIST, gzipped like Debian's dataset-fashion-mnist."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)

    def write(name, payload: bytes):
        path = os.path.join(folder, name + (".gz" if gz else ""))
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
            f.write(payload)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write(f"{prefix}-images-idx3-ubyte", struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        write(f"{prefix}-labels-idx1-ubyte", struct.pack(">II", 2049, n) + labels.tobytes())
    return folder


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """A data folder holding a fake CIFAR-10 (20 train / 8 test images)."""
    return write_fake_cifar10(str(tmp_path_factory.mktemp("cifar_data")))


@pytest.fixture(scope="session")
def fake_folder(tmp_path_factory):
    """A fake ImageFolder dataset: 3 classes, 4 train / 2 val images each."""
    return write_fake_image_folder(str(tmp_path_factory.mktemp("folder_data")))


@pytest.fixture(scope="session")
def fake_fmnist_system(tmp_path_factory):
    """A folder laid out like /usr/share/datasets/fashion-mnist (gzipped idx files)."""
    return write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist_system")))
