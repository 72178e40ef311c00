"""Data-loading pieces every task uses: the evaluation sampler, worker seeding, classes files, image decoding."""
from __future__ import annotations

import os
import random
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import UserError


def open_rgb(path: str, hint: str = "replace or remove the file"):
    """The image at ``path`` as a loaded RGB ``PIL.Image`` (also torchvision ``ImageFolder``'s
    ``loader``); a file that is missing or does not decode is a :class:`UserError` naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist", hint) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        why = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"image {path} cannot be decoded ({why})", hint) from None


class ShardSampler(Sampler):
    """Evaluation sampler: rank ``r`` of ``w`` takes indices ``r, r + w, ...`` -- no padding, so no
    sample counts twice in the metrics reduced over the ranks."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def seed_worker(worker_id: int):
    """``worker_init_fn``: Python's and NumPy's RNGs of a loader worker follow its torch seed."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def classes_file_near(data_root: str, names: Sequence[str], *extra: Optional[str]) -> Optional[str]:
    """A classes file that belongs to a data root: in the root, in the folders ``extra``, or -- when the
    root is (inside) a ``VOCdevkit`` folder -- next to that folder (the scene set keeps
    ``classes.txt`` / ``classes_seg.txt`` beside ``VOCdevkit/``)."""
    folders = [data_root] + [e for e in extra if e]
    p = os.path.abspath(os.path.expanduser(data_root or "."))
    while p != os.path.dirname(p):
        if os.path.basename(p) == "VOCdevkit":
            folders.append(os.path.dirname(p))
            break
        p = os.path.dirname(p)
    for folder in folders:
        for name in names:
            f = os.path.join(os.path.expanduser(folder), name)
            if os.path.isfile(f):
                return f
    return None


def load_coco_api(ann_file: str, hint: str):
    """``pycocotools.coco.COCO`` of an annotation file, quietly; a file that is not COCO JSON is a
    one-line error."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from .errors import UserError
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(ann_file)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"COCO annotation file {ann_file} is not valid COCO JSON ({type(e).__name__}: {e})",
                        hint) from None
