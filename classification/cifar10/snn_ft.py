"""Layer-wise fine-tuning of a converted CIFAR-10 SNN, signed IF neurons by default.

    python snn_ft.py --arch alex --bit 2 -id 0 -n 1 --force --init result/alex_2bit/model_best.pth.tar

--method STAGES chooses the stages (default fastsnn+e2e: the original layer-wise algorithm, then a short
end-to-end pass of --e2e-batches batches; --method fastsnn is the original alone). Without --force a
tuned layer is kept only if the whole SNN's train-set top-1 improves (--score-batches N judges on N batches). Saves result/<arch>_<bit>bit_ft/model_best.pth.tar (an
ANN-format state dict, reloadable by snn.py --init) and metrics_snn_ft_<neuron>_T<T>.json with the
per-layer history. -e evaluates the SNN of --init on the test set and stops.
"""
from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)  # this folder's snn.py must not shadow the snn package

from classification import workflow  # noqa: E402
from classification.cifar10.task import TASK  # noqa: E402
from common import run_cli  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    workflow.add_common_args(p, TASK, script="ft", bit_default=2, print_freq_default=10, lr_default=1e-3,
                             lr_help="fine-tuning learning rate (constant)", wd_default=None,
                             init_help="ANN checkpoint (default <out>/<arch>_<bit>bit/model_best.pth.tar)")
    workflow.add_snn_args(p)
    workflow.add_finetune_args(p)
    return p


def main(argv=None):
    return workflow.finetune_snn(get_parser().parse_args(argv), TASK)


if __name__ == "__main__":
    run_cli(main)
