"""The CIFAR task: 32x32 datasets, the CIFAR model zoo, LR x0.1 at 50 % and 75 % of the epochs."""
from __future__ import annotations

import argparse

from classification.data import DATASETS, build_datasets, build_loaders
from classification.models import CIFAR_ARCHS
from classification.workflow import Data, Task
from common.logger import log


def add_data_args(p):
    p.add_argument("-ct", "--cifar-type", type=int, default=10, choices=(10, 100),
                   help="10 or 100 (100 selects --dataset cifar100)")
    p.add_argument("--data", default="data", metavar="DIR",
                   help="dataset folder, relative to the working directory (default data/)")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="cifar10 (default), cifar100, fashionmnist, or folder (DIR/train/<class>/*, DIR/val/<class>/*)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N", help="use a fixed random N training images")
    p.add_argument("--val-subset", type=int, default=None, metavar="N", help="use a fixed random N test images")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR / Fashion-MNIST when missing (default on)")


def dataset_name(args) -> str:
    """``--dataset``, or ``cifar100`` for ``-ct 100``."""
    return "cifar100" if args.cifar_type == 100 and args.dataset == "cifar10" else args.dataset


def namespace(args) -> str:
    """Run folders: ``result/<arch>_<bit>bit`` for CIFAR-10 (the original's paths),
    ``result/<dataset>/<arch>_<bit>bit`` for the others."""
    name = dataset_name(args)
    return "" if name == "cifar10" else name


def build_data(args, ctx) -> Data:
    name = dataset_name(args)
    spec = build_datasets(name, args.data, args.train_subset, args.val_subset, download=args.download)
    train, val = build_loaders(spec, ctx, args.batch_size, args.workers, args.test_batch_size,
                               seed=getattr(args, "seed", None))
    log(f"data: {spec.name}, {len(spec.train)} train / {len(spec.val)} test images, {spec.num_classes} classes")
    return Data(spec.name, spec.num_classes, train, val, spec.info)


def milestones(epochs: int):
    """150 and 225 for the original's 300 epochs (duplicates / epoch 0 dropped for short runs)."""
    return sorted({m for m in (epochs // 2, epochs * 3 // 4) if m > 0})


TASK = Task(name="cifar10", model_dataset="cifar", archs=CIFAR_ARCHS, default_arch="resnet20",
            build_data=build_data, milestones=milestones, input_size=32, extra_args=add_data_args,
            namespace=namespace, dataset_name=dataset_name)
