"""Train (or, with -e, evaluate) a quantized ANN on ImageNet, one process or DDP, DALI or torchvision input.

The README recipe, from the repository root or from this folder; -b is per process:

    python -m torch.distributed.launch --nproc_per_node=4 dali_main.py -a alexnet -b 256 --bit 4 --workers 4 --lr=0.025 --epochs 60 --dali_cpu /data/imagenet2012
    python -m torch.distributed.launch --nproc_per_node=4 dali_main.py -a alexnet -b 256 --bit 3 --init result/alexnet_4bit/model_best.pth.tar --workers 4 --lr=0.0025 --epochs 60 --dali_cpu /data/imagenet2012
    python -m torch.distributed.launch --nproc_per_node=4 dali_main.py -a alexnet -b 256 --bit 2 --init result/alexnet_3bit/model_best.pth.tar --workers 4 --lr=0.0025 --epochs 60 --dali_cpu /data/imagenet2012

torchrun --nproc_per_node=N works the same; without a launcher it runs in one process (GPU if any,
else CPU). Architectures: alexnet, vgg16, vgg11, resnet18, resnet34. LR: lr * 0.1^(epoch // 20), an
extra x0.1 from epoch 50 (not scaled by the number of processes). --pretrained starts from
torchvision's weights (resnet18 / resnet34) or a local state-dict file. Writes
result/imagenet/<arch>_<bit>bit/{checkpoint.pth.tar, model_best.pth.tar, history.json, metrics_ann.json} on
rank 0; --resume auto continues a killed run.
"""
from common.cli import unshadow_script_dir

unshadow_script_dir(__file__)  # this folder's snn.py must not shadow the snn package

from classification import workflow  # noqa: E402
from classification.imagenet import task  # noqa: E402
from common import run_cli  # noqa: E402


def get_parser():
    return task.get_parser("train", __doc__.split("\n\n")[0])


def main(argv=None):
    args = task.parse_args("train", argv, __doc__.split("\n\n")[0])
    return workflow.train_ann(args, task.prepare(args, "train"))


if __name__ == "__main__":
    run_cli(main)
