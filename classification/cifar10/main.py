"""Train (or, with -e, evaluate) a quantized ANN on CIFAR-10.

Progressive recipe, from the repository root or from this folder:

    python main.py --arch alex --bit 32 -id 0 --wd 5e-4
    python main.py --arch alex --bit 4 -id 0 --wd 1e-4 --lr 4e-2 --init result/alex_32bit/model_best.pth.tar
    python main.py --arch alex --bit 3 -id 0 --wd 1e-4 --lr 4e-2 --init result/alex_4bit/model_best.pth.tar
    python main.py --arch alex --bit 2 -id 0 --wd 3e-5 --lr 4e-2 --init result/alex_3bit/model_best.pth.tar

Writes result/<arch>_<bit>bit/{checkpoint.pth.tar, model_best.pth.tar, history.json, metrics_ann.json}
(result/<dataset>/<arch>_<bit>bit for --dataset other than cifar10; -e writes metrics_ann_eval.json
beside the evaluated checkpoint);
--resume auto continues a killed run. Multi-GPU: torchrun --nproc_per_node=N main.py ...
"""
from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)  # this folder's snn.py must not shadow the snn package

from classification import workflow  # noqa: E402
from classification.cifar10.task import TASK  # noqa: E402
from common import run_cli  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    workflow.add_common_args(p, TASK, script="train", bit_default=32, print_freq_default=100,
                             init_help="checkpoint to initialise from (a higher-bit or float model; "
                                       "missing activation / weight clips start at their defaults)")
    return p


def main(argv=None):
    return workflow.train_ann(get_parser().parse_args(argv), TASK)


if __name__ == "__main__":
    run_cli(main)
