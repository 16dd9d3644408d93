"""klora: LoRA fine-tuning of keras-hub encoders on Keras 3."""

from klora.apply import adapted_layers, apply
from klora.layers import LoRADense, LoRAEinsumDense
from klora.merge import merge, unload, unmerge
from klora.summary import summary

__version__ = "0.1.0"
