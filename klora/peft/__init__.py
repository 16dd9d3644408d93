"""Adapters as Hugging Face PEFT files, in both directions.

An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig`,
`klora.peft.config`) and `adapter_model.safetensors` (`klora.peft.safetensors`)
with PEFT's parameter names (`klora.peft.names`), e.g.
`base_model.model.encoder.layer.0.attention.self.query.lora_A.weight` of
shape `[r, in]` and `...lora_B.weight` of shape `[out, r]`. Trained head
layers are saved like PEFT's `modules_to_save` (`base_model.model.classifier.weight`,
`[out, in]`, and `.bias`); other trained non-adapter weights under
`base_model.model.<variable.path>`. klora's own information (the model class
and the caller's `metadata`, e.g. a label map) lives in the safetensors
header's `__metadata__`, so the config stays a plain PEFT config.
"""

from klora.peft.load import load_adapter, read_adapter_metadata
from klora.peft.save import save_adapter
