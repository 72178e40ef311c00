"""ImageNet input pipelines: NVIDIA DALI when it is importable, torchvision otherwise.

Both back-ends read an ImageFolder tree (``<split>/<class folder>/<image>``; labels = the class
folders in sorted order, as ``torchvision.datasets.ImageFolder`` and DALI's ``readers.file`` both
assign them) and apply the same augmentations:

* train: random-resized crop (area 0.1-1 of the image, aspect ratio 0.8-1.25) resized to
  ``input_size`` (224), horizontal flip with p = 0.5;
* val: resize the shorter side to ``round(input_size * 256 / 224)`` (256), centre crop ``input_size``;
* both: ImageNet mean / std normalisation, float32 CHW.

DALI decodes on the GPU (``"mixed"`` nvJPEG decoder) when a GPU is used, on the CPU with
``dali_cpu=True`` or when there is no GPU. Under DDP each rank reads its own shard: DALI
``shard_id=rank, num_shards=world_size`` (padded to equal shard sizes for training, so every rank
runs the same number of iterations), torch a ``DistributedSampler`` for training and a non-padding
strided split for validation. Validation is *exact* under DDP with both back-ends: every image is
seen by exactly one rank, once (DALI's padding samples are dropped), so sums reduced over ranks
give the true accuracy.

Every loader yields ``(images, labels)`` already on the target device (``labels`` int64, shape
``[B]``) and has ``len()`` (batches per epoch on this rank), ``set_epoch(epoch)``, ``num_samples``
(images this rank sees per epoch), ``dataset_size`` (images in the split), ``classes`` and ``backend``.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

from common.errors import UserError
from common.loaders import IMAGENET_MEAN, IMAGENET_STD, ShardSampler, open_rgb

#: the original's crop sizes: 224 crops, validation images resized to 256 first
DEFAULT_INPUT_SIZE = 224
BACKENDS = ("auto", "dali", "torch")


class DataError(UserError, ValueError):
    """A bad data path / layout or loader option: a :class:`common.errors.UserError`, so the scripts
    print it as one ``error: ...`` line."""


# ----------------------------------------------------------------------------------------- paths
def resolve_data_dirs(data: Sequence[str] | str) -> Tuple[str, str]:
    """``(train_dir, val_dir)`` from the positional data argument(s), as in the original:
    one path holding ``train/`` and ``val/``, or the two paths (train first). Checks they exist."""
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise DataError("no data path given", "pass the ImageNet root (holding train/ and val/) or the "
                        "train and val folders")
    if len(paths) > 2:
        raise DataError(f"too many data paths ({len(paths)})", "pass the root, or the train and val folders")
    paths = [os.path.expanduser(str(p)) for p in paths]
    for p in paths:
        if not os.path.isdir(p):
            raise DataError(f"data directory not found: {p}",
                            "pass the ImageNet root holding train/ and val/ (or the two folders)")
    if len(paths) == 1:
        train_dir, val_dir = os.path.join(paths[0], "train"), os.path.join(paths[0], "val")
        for d in (train_dir, val_dir):
            if not os.path.isdir(d):
                raise DataError(f"data directory not found: {d}",
                                f"the data root {paths[0]} must hold train/ and val/ ImageFolder trees, "
                                "or pass the train and val folders")
    else:
        train_dir, val_dir = paths
    return train_dir, val_dir


def find_classes(folder: str) -> List[str]:
    """Sorted class sub-folders of an ImageFolder split (raises :class:`DataError` when none)."""
    if not os.path.isdir(folder):
        raise DataError(f"data directory not found: {folder}", "check the data path")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {folder}", f"arrange the images as {folder}/<class>/<image>.JPEG")
    return classes


def check_classes(train_dir: Optional[str], val_dir: Optional[str]) -> List[str]:
    """The class list; when both splits are given their class folders must be identical (labels are
    the folder positions, so a missing folder would shift every later label)."""
    tr = find_classes(train_dir) if train_dir else None
    va = find_classes(val_dir) if val_dir else None
    if tr is not None and va is not None and tr != va:
        only_tr, only_va = sorted(set(tr) - set(va)), sorted(set(va) - set(tr))
        detail = []
        if only_tr:
            detail.append(f"only in train: {', '.join(only_tr[:3])}{' ...' if len(only_tr) > 3 else ''}")
        if only_va:
            detail.append(f"only in val: {', '.join(only_va[:3])}{' ...' if len(only_va) > 3 else ''}")
        raise DataError(f"train and val class folders differ ({'; '.join(detail) or 'order'}): "
                        f"{train_dir} vs {val_dir}", "give both splits the same class sub-folders")
    return tr if tr is not None else va


def val_resize(input_size: int) -> int:
    """Shorter side before the centre crop: 256 for 224, the same ratio otherwise."""
    return int(round(input_size * 256 / 224))


def check_input_size(input_size) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 8:
        raise DataError(f"--input-size {input_size!r} must be an integer >= 8", "use --input-size 224")
    return input_size


# --------------------------------------------------------------------------------------- back-end
def dali_available() -> bool:
    """Whether ``nvidia.dali`` (and its PyTorch plug-in) imports."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a broken install
        return False
    return True


def choose_backend(loader: str = "auto") -> str:
    """``auto`` -> ``dali`` when importable, else ``torch``; ``dali`` requires it."""
    if loader not in BACKENDS:
        raise DataError(f"--loader {loader!r} is not a loader", f"choose from {', '.join(BACKENDS)}")
    if loader == "torch":
        return "torch"
    if dali_available():
        return "dali"
    if loader == "dali":
        raise DataError("--loader dali: NVIDIA DALI is not installed",
                        "pip install -r requirements-dali.txt, or use --loader torch")
    return "torch"


# ------------------------------------------------------------------------------------ torchvision
def train_transform(input_size: int = DEFAULT_INPUT_SIZE):
    from torchvision.transforms import v2
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(input_size, scale=(0.1, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(input_size: int = DEFAULT_INPUT_SIZE):
    from torchvision.transforms import v2
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(val_resize(input_size), antialias=True),
        v2.CenterCrop(input_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _image_folder(folder: str, transform):
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(folder, transform=transform, loader=open_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read images from {folder}: {msg}",
                        f"put the images into one sub-folder per class ({folder}/<class>/<image>.JPEG)") from e


class _Loader:
    """Common front: yields ``(x, y)`` on ``device``; skips empty batches."""

    backend = "?"

    def __init__(self, device, channels_last: bool, classes, dataset_size: int, num_samples: int,
                 batch_size: int, train: bool):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.channels_last = bool(channels_last)
        self.classes = list(classes)
        self.dataset_size = int(dataset_size)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.train = bool(train)

    def _out(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True).view(-1).long()

    def set_epoch(self, epoch: int):
        pass


class TorchLoader(_Loader):
    backend = "torch"

    def __init__(self, folder: str, *, train: bool, batch_size: int, workers: int, input_size: int,
                 rank: int = 0, world_size: int = 1, device=None, channels_last: bool = False,
                 seed: Optional[int] = 0, drop_last: Optional[bool] = None):
        tf = train_transform(input_size) if train else val_transform(input_size)
        self.dataset = _image_folder(folder, tf)
        n = len(self.dataset)
        if train:
            self.sampler = torch.utils.data.DistributedSampler(
                self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed or 0, drop_last=False)
        else:
            self.sampler = ShardSampler(n, rank, world_size)
        drop_last = train if drop_last is None else drop_last
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=max(0, int(workers)),
            pin_memory=dev.type == "cuda", drop_last=drop_last,
            # training workers restart each epoch, seeded from torch's RNG, which a resumed run restores
            persistent_workers=int(workers) > 0 and not train)
        per_rank = len(self.sampler)
        used = (per_rank // batch_size) * batch_size if drop_last else per_rank
        super().__init__(dev, channels_last, self.dataset.classes, n, used, batch_size, train)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for x, y in self.loader:
            if x.shape[0]:
                yield self._out(x, y)


# ------------------------------------------------------------------------------------------- DALI
def _dali_pipeline(folder: str, *, train: bool, batch_size: int, workers: int, input_size: int,
                   rank: int, world_size: int, device_id: Optional[int], cpu_decode: bool,
                   seed: Optional[int]):
    from nvidia.dali import fn, pipeline_def, types

    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]
    gpu = device_id is not None and not cpu_decode

    @pipeline_def(batch_size=batch_size, num_threads=max(1, int(workers)), device_id=device_id,
                  seed=seed, prefetch_queue_depth=2)
    def pipe():
        jpegs, labels = fn.readers.file(
            file_root=folder, shard_id=rank, num_shards=world_size, random_shuffle=train,
            pad_last_batch=True, stick_to_shard=not train, name="Reader")
        decoder = "mixed" if gpu else "cpu"
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=[0.1, 1.0],
                random_aspect_ratio=[0.8, 1.25], num_attempts=100)
            images = fn.resize(images, resize_x=input_size, resize_y=input_size,
                               interp_type=types.INTERP_TRIANGULAR, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=val_resize(input_size),
                               interp_type=types.INTERP_TRIANGULAR, antialias=True)
            mirror = False
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=(input_size, input_size),
            mean=mean, std=std, mirror=mirror)
        if gpu:
            labels = labels.gpu()
        return images, labels

    p = pipe()
    p.build()
    return p


class DaliLoader(_Loader):
    backend = "dali"

    def __init__(self, folder: str, *, train: bool, batch_size: int, workers: int, input_size: int,
                 rank: int = 0, world_size: int = 1, device=None, channels_last: bool = False,
                 dali_cpu: bool = False, seed: Optional[int] = 0):
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

        classes = find_classes(folder)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev.type == "cuda" else None
        self.cpu_decode = bool(dali_cpu) or device_id is None
        try:
            self.pipeline = _dali_pipeline(folder, train=train, batch_size=batch_size, workers=workers,
                                           input_size=input_size, rank=rank, world_size=world_size,
                                           device_id=device_id, cpu_decode=self.cpu_decode,
                                           seed=None if seed is None else seed + 1000 * rank)
            n = int(self.pipeline.reader_meta("Reader")["epoch_size"])
        except RuntimeError as e:
            msg = str(e).strip().splitlines()
            msg = next((m for m in msg if m.strip()), type(e).__name__)
            raise DataError(f"DALI cannot read {folder}: {msg.strip()}",
                            "check the images, or read them with --loader torch") from e
        if n == 0:
            raise DataError(f"no images in {folder}", f"put the images into {folder}/<class>/")
        # training: fixed-size batches (BN needs > 1 sample; every rank runs the same number of steps);
        # validation: every image exactly once, padding dropped
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        self.iterator = DALIClassificationIterator(self.pipeline, reader_name="Reader",
                                                   last_batch_policy=policy, auto_reset=True)
        self._pos = 0  # validation batches consumed in the current DALI epoch
        shard = _dali_shard_size(n, rank, world_size)
        if train:
            padded = math.ceil(n / world_size)  # every shard is padded to this size
            num = (padded // batch_size) * batch_size
        else:
            num = shard
        super().__init__(dev, channels_last, classes, n, num, batch_size, train)

    def __len__(self):
        return len(self.iterator)

    def __iter__(self):
        """One epoch: ``len(self)`` batches. DALI cannot restart an epoch that a caller left early
        (a capped fine-tuning / scoring pass): the training stream then simply continues, across
        DALI's epoch boundary (it is shuffled anyway); validation drains the rest first, so it
        always covers every image exactly once."""
        if self.train:
            for _ in range(len(self.iterator)):
                try:
                    batch = next(self.iterator)
                except StopIteration:  # auto_reset has started the next DALI epoch
                    batch = next(self.iterator)
                x, y = batch[0]["data"], batch[0]["label"]
                if x.shape[0]:
                    yield self._out(x, y)
            return
        if self._pos:
            for _ in self._raw():
                pass
        for x, y in self._raw():
            if x.shape[0]:
                yield self._out(x, y)

    def _raw(self):
        while True:
            try:
                batch = next(self.iterator)
            except StopIteration:
                self._pos = 0
                return
            self._pos += 1
            yield batch[0]["data"], batch[0]["label"]


def _dali_shard_size(n: int, rank: int, world: int) -> int:
    return (n * (rank + 1)) // world - (n * rank) // world


# ------------------------------------------------------------------------------------------ front
def build_loader(folder: str, *, train: bool, batch_size: int, workers: int = 4,
                 input_size: int = DEFAULT_INPUT_SIZE, backend: str = "auto", dali_cpu: bool = False,
                 rank: int = 0, world_size: int = 1, device=None, channels_last: bool = False,
                 seed: Optional[int] = 0):
    """One split's loader (see the module docstring). ``backend``: auto / dali / torch."""
    check_input_size(input_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size {batch_size!r} must be a positive integer", "pass -b N with N >= 2")
    if train and batch_size < 2:
        raise DataError("the training batch size must be >= 2 per process (BatchNorm needs more than "
                        "one sample)", "pass -b 2 or more")
    find_classes(folder)
    kind = choose_backend(backend)
    kw = dict(train=train, batch_size=batch_size, workers=workers, input_size=input_size, rank=rank,
              world_size=world_size, device=device, channels_last=channels_last, seed=seed)
    if kind == "dali":
        return DaliLoader(folder, dali_cpu=dali_cpu, **kw)
    return TorchLoader(folder, **kw)


def build_loaders(train_dir: Optional[str], val_dir: Optional[str], *, batch_size: int,
                  val_batch_size: Optional[int] = None, **kw):
    """``(train_loader, val_loader)``; a split whose dir is ``None`` gives ``None``. Checks that the
    splits share their class folders."""
    check_classes(train_dir, val_dir)
    train = build_loader(train_dir, train=True, batch_size=batch_size, **kw) if train_dir else None
    val = build_loader(val_dir, train=False, batch_size=val_batch_size or batch_size, **kw) if val_dir else None
    if train is not None and len(train) == 0:
        raise DataError(f"{train_dir}: {train.dataset_size} training images give no full batch of "
                        f"{batch_size} per process on {kw.get('world_size', 1)} process(es)", "lower -b/--batch-size")
    return train, val


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_INPUT_SIZE", "BACKENDS", "DataError",
           "resolve_data_dirs", "find_classes", "check_classes", "val_resize", "check_input_size",
           "dali_available", "choose_backend", "train_transform", "val_transform", "ShardSampler",
           "TorchLoader", "DaliLoader", "build_loader", "build_loaders"]
