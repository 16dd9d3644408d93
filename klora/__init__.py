"""klora: LoRA fine-tuning of keras-hub encoders on Keras 3."""

from klora.adapter_files import load_adapter, read_adapter_metadata, save_adapter
from klora.adapters import (active_adapter, adapter_names, delete_adapter, disable_adapters,
                            set_adapter)
from klora.apply import adapted_layers, apply
from klora.layers import LoRADense, LoRAEinsumDense
from klora.merge import merge, unload, unmerge
from klora.remat import disable_remat, enable_remat
from klora.summary import summary

__version__ = "0.1.0"
