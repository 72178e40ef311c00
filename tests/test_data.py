"""classification/data.py on fake datasets in the real formats (and the Debian Fashion-MNIST when present)."""
import os
import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch

from classification import data as D
from common import UserError
from common.dist import Context

CPU = Context(torch.device("cpu"))


def _check_images(ds, n_channels=3):
    x, y = ds[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (n_channels, 32, 32)
    assert isinstance(y, int)
    return x


def test_cifar10_pickle_format(fake_cifar):
    spec = D.build_datasets("cifar10", fake_cifar, download=False)
    assert (len(spec.train), len(spec.val), spec.num_classes) == (20, 8, 10)
    assert spec.classes[0] == "airplane" and spec.info["train_size"] == 20
    x = _check_images(spec.val)
    # test transform = normalisation only: undo it and get the stored uint8 image back
    raw = spec.val.images[0].float() / 255
    mean, std = torch.tensor(D.CIFAR_MEAN).view(3, 1, 1), torch.tensor(D.CIFAR_STD).view(3, 1, 1)
    assert torch.allclose(x * std + mean, raw, atol=1e-5)
    with open(os.path.join(fake_cifar, "cifar-10-batches-py", "test_batch"), "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    assert spec.val.targets.tolist() == labels


def test_cifar_train_augmentation_varies(fake_cifar):
    spec = D.build_datasets("cifar10", fake_cifar, download=False)
    torch.manual_seed(0)
    views = torch.stack([spec.train[0][0] for _ in range(8)])
    assert views.std(0).max() > 0  # random crop / flip change the image


def test_data_may_point_at_the_batches_folder(fake_cifar):
    spec = D.build_datasets("cifar10", os.path.join(fake_cifar, "cifar-10-batches-py"), download=False)
    assert len(spec.train) == 20


def test_subsets_are_fixed_and_seed_independent(fake_cifar):
    a = D.build_datasets("cifar10", fake_cifar, train_subset=7, val_subset=3, download=False)
    torch.manual_seed(123)
    b = D.build_datasets("cifar10", fake_cifar, train_subset=7, val_subset=3, download=False)
    assert len(a.train) == 7 and len(a.val) == 3
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices
    assert len(D.build_datasets("cifar10", fake_cifar, train_subset=1000, download=False).train) == 20
    with pytest.raises(UserError):
        D.build_datasets("cifar10", fake_cifar, train_subset=0, download=False)


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(UserError) as e:
        D.build_datasets("cifar10", str(tmp_path / "nowhere"), download=False)
    assert "cifar-10-batches-py" in str(e.value) and "—" in str(e.value)


def test_cifar_download_failure_is_a_user_error(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        def __init__(self, *a, **k):
            raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(UserError) as e:
        D.build_datasets("cifar10", str(tmp_path), download=True)
    msg = str(e.value)
    assert "download failed" in msg and "cifar-10-batches-py" in msg and str(tmp_path) in msg


def test_cifar_incomplete_or_corrupt(fake_cifar, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(fake_cifar, root)
    os.remove(root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match="incomplete.*data_batch_3"):
        D.build_datasets("cifar10", str(root))
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a valid cifar10 batch"):
        D.build_datasets("cifar10", str(root))


def test_cifar100_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 4)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(range(n)), "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    spec = D.build_datasets("cifar100", str(tmp_path), download=False)
    assert spec.num_classes == 100 and len(spec.train) == 6 and spec.classes[3] == "c3"
    _check_images(spec.train)


def test_fashion_mnist_from_system_files(tmp_path, fake_fmnist_system, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", fake_fmnist_system)
    spec = D.build_datasets("fashionmnist", str(tmp_path), download=False)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(D.FMNIST_FILES)  # torchvision's layout, decompressed
    assert (len(spec.train), len(spec.val), spec.num_classes) == (12, 6, 10)
    x = _check_images(spec.val)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated to 3 channels
    border = x[0, :2, :] * D.FMNIST_STD[0] + D.FMNIST_MEAN[0]   # zero padding 28 -> 32
    assert torch.allclose(border, torch.zeros_like(border), atol=1e-6)
    # second time: the torchvision layout is used directly, even without the system files
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "gone"))
    assert len(D.build_datasets("fashionmnist", str(tmp_path), download=False).train) == 12


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        D.build_datasets("fashionmnist", str(tmp_path), download=False)

    class Offline:
        def __init__(self, *a, **k):
            raise urllib.error.URLError("offline")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(UserError, match="download failed.*dataset-fashion-mnist"):
        D.build_datasets("fashionmnist", str(tmp_path), download=True)


@pytest.mark.skipif(not os.path.isfile(os.path.join(D.DEBIAN_FASHION_MNIST, "t10k-images-idx3-ubyte.gz")),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    spec = D.build_datasets("fashionmnist", str(tmp_path), val_subset=100, download=False)
    assert spec.info["train_size"] == 60000 and spec.info["val_size"] == 10000 and len(spec.val) == 100
    assert spec.classes[0].startswith("T-shirt")
    _check_images(spec.train)


def test_image_folder(fake_folder):
    spec = D.build_datasets("folder", fake_folder)
    assert spec.classes == ["cat", "dog", "fish"] and len(spec.train) == 12 and len(spec.val) == 6
    _check_images(spec.train)
    _check_images(spec.val)  # grey JPEGs become RGB, any size becomes 32x32


def test_image_folder_errors(fake_folder, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        D.build_datasets("folder", str(tmp_path / "missing"))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="train/ and val/"):
        D.build_datasets("folder", str(tmp_path / "only_train"))
    bad = tmp_path / "mismatch"
    shutil.copytree(fake_folder, bad)
    shutil.rmtree(bad / "val" / "fish")
    with pytest.raises(UserError, match="class folders"):
        D.build_datasets("folder", str(bad))
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        D.build_datasets("folder", str(empty))
    with pytest.raises(UserError, match="unknown dataset"):
        D.build_datasets("mnist", str(tmp_path))


def test_loaders(fake_cifar):
    spec = D.build_datasets("cifar10", fake_cifar, download=False)
    train, val = D.build_loaders(spec, CPU, batch_size=6, workers=0, test_batch_size=5)
    assert len(train) == 3 and train.drop_last      # 20 // 6, the incomplete batch dropped (BN)
    x, y = next(iter(train))
    assert x.shape == (6, 3, 32, 32) and y.shape == (6,)
    assert [b[1].shape[0] for b in val] == [5, 3]   # evaluation keeps every image
    small, _ = D.build_loaders(spec, CPU, batch_size=32, workers=0)
    assert len(small) == 1 and not small.drop_last  # fewer images than a batch: keep them


def test_shard_sampler_partitions():
    for n in (0, 1, 7, 10):
        for w in (1, 2, 3):
            parts = [list(D.ShardSampler(n, r, w)) for r in range(w)]
            assert sorted(sum(parts, [])) == list(range(n))
