"""The LoRA layers: one mechanism (`LoRALayer`) on Keras' two linear layers."""

from klora.layers.lora import LoRALayer
from klora.layers.lora_dense import LoRADense
from klora.layers.lora_einsum_dense import LoRAEinsumDense
