"""Fast-SNN conversion core: IF neurons, converter, simulation, statistics, layer-wise fine-tuning."""
from .convert import ConversionError, QuantTracer, SpikingNetwork, convert
from .finetune import SpikingLayer, finetune, spiking_layers
from .monitor import E_AC_PJ, E_MAC_PJ, Monitor, describe, layer_errors
from .neuron import IFNeuron, if_constant, if_constant_counts, if_multistep
from .optimize import optimize  # snn.optimize is the function (module: snn.optimize in sys.modules)

__all__ = [n for n in dir() if not n.startswith("_")]
