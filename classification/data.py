"""Small-image classification data (32x32): CIFAR-10 / CIFAR-100, Fashion-MNIST, an image folder.

``--dataset``:

* ``cifar10`` (default): the python pickle batches (``cifar-10-batches-py/``) under ``--data``
  (default ``data/``, relative to the working directory as in the original). Downloaded with
  ``torchvision.datasets.CIFAR10`` only when the files are missing (``--no-download`` forbids it).
* ``cifar100``: ``cifar-100-python/`` likewise (also selected by ``-ct/--cifar-type 100``).
* ``fashionmnist``: torchvision's layout ``<data>/FashionMNIST/raw/*-ubyte``; if absent, the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``, or
  ``$FASHION_MNIST_DIR``) is decompressed into that layout, else torchvision downloads it.
  28x28 grey images are zero-padded to 32x32 and replicated to 3 channels.
* ``folder``: ``<data>/train/<class>/*`` and ``<data>/val/<class>/*`` (``test/`` also accepted), any
  image format PIL reads, resized to 32x32 RGB.

Augmentation: RandomCrop(32, padding 4) + horizontal flip for training, then
normalisation with per-dataset statistics (CIFAR-10's ``(0.491, 0.482, 0.447) / (0.247, 0.243, 0.262)``
for CIFAR and folders). Fashion-MNIST also gets the flip: its classes (garments, bags, shoes) are
left/right symmetric or orientation-free, so a mirrored image is a valid sample of the same class.

The CIFAR and Fashion-MNIST images are held in memory as one uint8 tensor and augmented with
``torchvision.transforms.v2`` on tensors (no PIL round trip). ``--train-subset`` / ``--val-subset``
keep a fixed, seed-independent random subset (the same images in every run of a chain).
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from common import UserError
from common.logger import log
from common.dist import Context
from common.loaders import ShardSampler, open_rgb  # noqa: F401 (ShardSampler: part of this module's interface)

DATASETS = ("cifar10", "cifar100", "fashionmnist", "folder")
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
CIFAR100_MEAN, CIFAR100_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
# Fashion-MNIST statistics of the zero-padded 32x32 images
FMNIST_MEAN, FMNIST_STD = (0.219,) * 3, (0.332,) * 3
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
CIFAR_URL = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
             "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
_CIFAR = {  # folder, train files, test files, label key, meta file, names key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}
IMAGE_SIZE = 32


@dataclass
class DataSpec:
    """What a task script needs to know about its data."""

    name: str
    train: Dataset
    val: Dataset
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ImageTensorDataset(Dataset):
    """Images held as one uint8 tensor ``[N, C, H, W]``; ``channels=3`` replicates grey images."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform=None, channels: int = 3):
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.transform = transform
        self.channels = channels

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i]
        if img.shape[0] != self.channels:
            img = img.expand(self.channels, *img.shape[1:])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


# ---------------------------------------------------------------------------------------- transforms
def build_transforms(mean, std, train: bool, resize: bool = False):
    """RandomCrop(32, pad 4) + HFlip for training, then normalisation (the original's CIFAR recipe)."""
    from torchvision.transforms import v2
    ops = [v2.ToImage(), v2.Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True)] if resize else []
    if train:
        ops += [v2.RandomCrop(IMAGE_SIZE, padding=4), v2.RandomHorizontalFlip()]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


# ---------------------------------------------------------------------------------------- CIFAR
def _cifar_folder(name: str, root: str) -> str:
    sub = _CIFAR[name][0]
    if os.path.isfile(os.path.join(root, _CIFAR[name][2][0])):  # --data points at the batches folder
        return root
    return os.path.join(root, sub)


def _cifar_missing(name: str, folder: str) -> List[str]:
    _, train, test, _, meta, _ = _CIFAR[name]
    return [f for f in train + test if not os.path.isfile(os.path.join(folder, f))]


def _download_cifar(name: str, root: str):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sub = _CIFAR[name][0]
    print(f"[data] {sub} not found under {root}: downloading {CIFAR_URL[name]}", flush=True)
    try:
        cls(root, train=True, download=True)
    except Exception as e:  # noqa: BLE001 - offline, proxy, disk full ...: one line for the user
        raise UserError(f"{name} not found under {root} and the download failed ({type(e).__name__}: {e})",
                        f"put the extracted '{sub}' folder ({CIFAR_URL[name]}) into {root}, "
                        "or pass --data DIR") from None


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_cifar(name: str, folder: str, files: List[str]) -> Tuple[torch.Tensor, List[int]]:
    label_key = _CIFAR[name][3]
    data, labels = [], []
    for f in files:
        path = os.path.join(folder, f)
        try:
            d = _unpickle(path)
            data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += list(d[label_key])
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a valid {name} batch ({type(e).__name__}: {e})",
                            f"delete the folder {folder} and let it download again, or restore the file") from None
    return torch.from_numpy(np.concatenate(data)), labels


def _cifar_classes(name: str, folder: str, n: int) -> List[str]:
    meta = os.path.join(folder, _CIFAR[name][4])
    if os.path.isfile(meta):
        try:
            return list(_unpickle(meta)[_CIFAR[name][5]])
        except Exception:  # noqa: BLE001 - class names are cosmetic
            pass
    return [str(i) for i in range(n)]


def cifar(name: str, root: str, download: bool = True) -> DataSpec:
    folder = _cifar_folder(name, root)
    missing = _cifar_missing(name, folder)
    if missing and os.path.isdir(folder):
        raise UserError(f"{folder} is incomplete (missing {', '.join(missing)})",
                        f"delete it to download {name} again, or restore the files")
    if missing:
        if not download:
            raise UserError(f"{name} not found under {root} (no '{_CIFAR[name][0]}' folder)",
                            f"put the extracted '{_CIFAR[name][0]}' folder ({CIFAR_URL[name]}) into {root}, "
                            "pass --data DIR, or drop --no-download")
        _download_cifar(name, root)
        folder = _cifar_folder(name, root)
    _, train_files, test_files, *_ = _CIFAR[name]
    xtr, ytr = _read_cifar(name, folder, train_files)
    xte, yte = _read_cifar(name, folder, test_files)
    n_classes = 10 if name == "cifar10" else 100
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return DataSpec(name, ImageTensorDataset(xtr, ytr, build_transforms(mean, std, True)),
                    ImageTensorDataset(xte, yte, build_transforms(mean, std, False)),
                    _cifar_classes(name, folder, n_classes), mean, std, {"folder": folder})


# ---------------------------------------------------------------------------------------- Fashion-MNIST
def _system_fmnist_dir() -> str:
    return os.environ.get("FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST)


def _install_fmnist_from(src: str, raw: str):
    """Decompress ``src/*-ubyte.gz`` into torchvision's raw folder (atomically per file)."""
    os.makedirs(raw, exist_ok=True)
    for f in FMNIST_FILES:
        dst = os.path.join(raw, f)
        if os.path.isfile(dst):
            continue
        gz, plain = os.path.join(src, f + ".gz"), os.path.join(src, f)
        tmp = dst + ".tmp"
        if os.path.isfile(gz):
            with gzip.open(gz, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo)
        else:
            shutil.copyfile(plain, tmp)
        os.replace(tmp, dst)


def _fmnist_available(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) or os.path.isfile(os.path.join(folder, f + ".gz"))
               for f in FMNIST_FILES)


def fashion_mnist(root: str, download: bool = True) -> DataSpec:
    import torchvision
    raw = os.path.join(root, "FashionMNIST", "raw")
    source = raw
    if not all(os.path.isfile(os.path.join(raw, f)) for f in FMNIST_FILES):
        system = _system_fmnist_dir()
        if _fmnist_available(system):
            print(f"[data] using Fashion-MNIST from {system} (decompressed into {raw})", flush=True)
            _install_fmnist_from(system, raw)
            source = system
        elif download:
            try:
                torchvision.datasets.FashionMNIST(root, train=True, download=True)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"Fashion-MNIST not found (neither {raw} nor {system}) and the download failed "
                                f"({type(e).__name__}: {e})",
                                "install the Debian package dataset-fashion-mnist (apt-get install "
                                f"dataset-fashion-mnist) or put the four *-ubyte files into {raw}") from None
        else:
            raise UserError(f"Fashion-MNIST not found (neither {raw} nor {system})",
                            "apt-get install dataset-fashion-mnist, put the four *-ubyte files into "
                            f"{raw}, or drop --no-download")
    sets = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.FashionMNIST(root, train=train, download=False)
        except (RuntimeError, ValueError, AssertionError) as e:
            raise UserError(f"the Fashion-MNIST files in {raw} are unreadable ({e})",
                            f"delete {raw} and run again") from None
        images = torch.nn.functional.pad(ds.data, (2, 2, 2, 2)).unsqueeze(1)  # [N, 1, 32, 32] uint8
        sets.append(ImageTensorDataset(images, ds.targets, build_transforms(FMNIST_MEAN, FMNIST_STD, train)))
        classes = list(ds.classes)
    return DataSpec("fashionmnist", sets[0], sets[1], classes, FMNIST_MEAN, FMNIST_STD, {"source": source})


# ---------------------------------------------------------------------------------------- image folder
def image_folder(root: str) -> DataSpec:
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist",
                        "pass --data DIR holding train/<class>/* and val/<class>/* images")
    val_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir) or val_dir is None:
        raise UserError(f"{root} must hold train/ and val/ (or test/) sub-folders with one folder per class",
                        "arrange the images as DIR/train/<class>/*.png and DIR/val/<class>/*.png")
    sets = []
    for d, train in ((train_dir, True), (val_dir, False)):
        try:
            sets.append(ImageFolder(d, transform=build_transforms(CIFAR_MEAN, CIFAR_STD, train, resize=True),
                                    loader=open_rgb))
        except FileNotFoundError as e:
            raise UserError(f"no images found in {d} ({e})",
                            "put the images into one sub-folder per class (DIR/train/<class>/*.png)") from None
    if sets[0].classes != sets[1].classes:
        raise UserError(f"the class folders of {train_dir} and {val_dir} differ "
                        f"({sets[0].classes[:5]} vs {sets[1].classes[:5]})",
                        "use the same class sub-folders in train/ and val/")
    return DataSpec("folder", sets[0], sets[1], list(sets[0].classes), CIFAR_MEAN, CIFAR_STD, {"folder": root})


# ---------------------------------------------------------------------------------------- entry points
def subset(ds: Dataset, n: Optional[int], seed: int = 0, flag: str = "--val-subset") -> Dataset:
    """A fixed random subset of ``n`` samples (``None`` or ``n >= len``: the whole set, said in one line
    when ``n`` exceeds it)."""
    if n is not None and n > len(ds):
        log(f"{flag} {n}: the set has {len(ds)} samples, all used")
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise UserError(f"subset size {n} must be positive", "pass --train-subset / --val-subset N >= 1")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(ds, idx.tolist())


def build_datasets(name: str, root: str, train_subset: Optional[int] = None, val_subset: Optional[int] = None,
                   download: bool = True) -> DataSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}", f"choose one of {', '.join(DATASETS)}")
    if name in _CIFAR:
        spec = cifar(name, root, download)
    elif name == "fashionmnist":
        spec = fashion_mnist(root, download)
    else:
        spec = image_folder(root)
    spec.info.update(train_size=len(spec.train), val_size=len(spec.val))
    spec.train, spec.val = subset(spec.train, train_subset, flag="--train-subset"), subset(spec.val, val_subset)
    return spec


def build_loaders(spec: DataSpec, ctx: Context, batch_size: int, workers: int,
                  test_batch_size: int = 100, seed: Optional[int] = None) -> Tuple[DataLoader, DataLoader]:
    """Shuffled training loader (DistributedSampler under DDP) and an unshuffled evaluation loader.

    The training loader has its own ``torch.Generator`` (seeded with ``seed + rank``; without a seed,
    from torch's RNG once): the shuffling order and the workers' seeds come from it alone, so nothing
    else that draws random numbers (a display, a model built later) changes the data order, and a
    resumed run restores it (:func:`common.runs.loader_generators`). Its workers restart
    every epoch (not persistent), seeded from that generator, so a resumed epoch gets the same ones."""
    pin = ctx.device.type == "cuda"
    if ctx.distributed:
        train_sampler = DistributedSampler(spec.train, ctx.world_size, ctx.rank, shuffle=True,
                                           seed=0 if seed is None else seed)
        val_sampler = ShardSampler(len(spec.val), ctx.rank, ctx.world_size)
    else:
        train_sampler = val_sampler = None
    gen = torch.Generator()
    gen.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed + ctx.rank)
    per_rank = len(spec.train) // ctx.world_size
    train = DataLoader(spec.train, batch_size=batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                       drop_last=per_rank > batch_size, num_workers=workers, pin_memory=pin, generator=gen)
    val = DataLoader(spec.val, batch_size=test_batch_size, shuffle=False, sampler=val_sampler, num_workers=workers,
                     pin_memory=pin, persistent_workers=workers > 0)
    return train, val
