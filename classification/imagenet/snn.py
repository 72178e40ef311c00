"""Convert a quantized ImageNet ANN into an SNN (T = 2^bit - 1) and evaluate it on the validation set.

The original README's commands (leave out -u for the signed IF neuron, the default):

    python -m torch.distributed.launch --nproc_per_node=4 snn.py -a alexnet -b 256 -e -u --bit 3 --init result/alexnet_3bit/model_best.pth.tar --workers 4 --dali_cpu /data/imagenet2012
    python -m torch.distributed.launch --nproc_per_node=4 snn.py -a alexnet -b 256 -e --bit 2 --init result/alexnet_2bit/model_best.pth.tar --workers 4 --dali_cpu /data/imagenet2012

3 bits -> T = 7, 2 bits -> T = 3. Prints ' * Acc@1 .. Acc@5 ..' and writes (rank 0)
metrics_snn_<signed|unsigned>_T<T>.json beside the --init checkpoint: SNN and ANN top-1/top-5, accuracy after
every step, per-layer firing rate / agreement with the ANN, SOPs, energy -- all reduced over ranks.
-e is accepted for compatibility: this script always evaluates. --init also takes snn_ft.py's output.
"""
from common.cli import unshadow_script_dir

unshadow_script_dir(__file__)  # this file must not shadow the snn package

from classification import workflow  # noqa: E402
from classification.imagenet import task  # noqa: E402
from common import run_cli  # noqa: E402


def get_parser():
    return task.get_parser("snn", __doc__.split("\n\n")[0])


def main(argv=None):
    args = task.parse_args("snn", argv, __doc__.split("\n\n")[0])
    return workflow.evaluate_snn(args, task.prepare(args, "snn"))


if __name__ == "__main__":
    run_cli(main)
