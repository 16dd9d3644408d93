"""klora: LoRA fine-tuning of keras-hub encoders on Keras 3."""

from klora.adapted_model import active_adapter, adapted_layers, adapter_names
from klora.adapters import delete_adapter, disable_adapters, set_adapter
from klora.apply import apply
from klora.config import LoraConfig
from klora.export import export
from klora.layers import LoRADense, LoRAEinsumDense
from klora.loraplus import loraplus
from klora.merge import merge, unload, unmerge
from klora.peft import load_adapter, read_adapter_metadata, save_adapter
from klora.serving import predict_with_adapters
from klora.speed import disable_remat, enable_remat
from klora.summary import summary
from klora.version import __version__
from klora import tasks  # registers klora's task models for keras.saving.load_model
