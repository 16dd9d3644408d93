from klora.layers.fast_attention import FastMultiHeadAttention
from klora.layers.fast_dropout import FastDropout
from klora.layers.lora_dense import LoRADense
from klora.layers.lora_einsum_dense import LoRAEinsumDense
from klora.layers.lora_layer import LoRALayer
