"""Activation rematerialization of keras-hub transformer blocks (JAX), for memory.

A training step keeps each block's intermediate activations until the backward
pass needs them. `enable_remat` makes every `keras_hub.layers.TransformerEncoder`
of a model keep only its matmul outputs; the element-wise rest (layer norms,
softmax, GELU, masked scores, residual sums, and `FastDropout`'s masks, which
are a hash of their seeds) is recomputed in the backward pass, through
`jax.checkpoint` with a policy that saves dots. Gradients are unchanged: the
recomputed forward sees the same weights and dropout seeds.

The block's state (its dropout `SeedGenerator`s) is threaded through the
checkpoint explicitly, with a `keras.StatelessScope`, which is what keeps the
rematerialized block usable inside Keras' jitted `train_step`.

On all-MiniLM-L6-v2 at batch 32 x 384 with q+v LoRA (dropout 0.1, this
project's 2-core CPU) XLA's temporary buffers for a training step shrink from
7,708 to 6,214 MiB (peak RSS 9,320 -> 7,853 MiB) at a few percent of step time;
with all-linear adapters XLA CPU's temporaries barely move (7,247 -> 7,049
MiB). `bench/remat.py` measures it. Policies that save less (no dots, or only
dots without batch dimensions) did not lower XLA CPU's peak further, so they
are not offered.

>>> klora.enable_remat(backbone)    # before compile / fit
>>> klora.disable_remat(backbone)   # back to keras-hub's class
"""

import keras
import keras_hub

from klora.speed.fast_layers import swap_classes


@keras.saving.register_keras_serializable(package="klora")
class TransformerEncoder(keras_hub.layers.TransformerEncoder):
    """`keras_hub.layers.TransformerEncoder` that rematerializes its training forward on JAX.

    Same arguments, config, weights and results as keras-hub's class. Inference,
    attention-score outputs and the TensorFlow/torch backends run keras-hub's
    `call` unchanged. `enable_remat` turns a model's blocks into this class.
    It keeps keras-hub's class name because Keras names saved weights after
    the class: a model saved with remat on loads with or without it.
    """

    def call(self, inputs, padding_mask=None, attention_mask=None, training=None,
             return_attention_scores=False):
        plain_call = super().call
        if not training or return_attention_scores or keras.backend.backend() != "jax":
            return plain_call(inputs, padding_mask=padding_mask, attention_mask=attention_mask,
                              training=training, return_attention_scores=return_attention_scores)
        import jax

        variables = self.variables

        def block(values, inputs, padding_mask, attention_mask):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                outputs = plain_call(inputs, padding_mask=padding_mask,
                                     attention_mask=attention_mask, training=True)
            return outputs, [scope.get_current_value(v) for v in variables]

        outputs, updated = jax.checkpoint(block, policy=jax.checkpoint_policies.checkpoint_dots)(
            [v.value for v in variables], inputs, padding_mask, attention_mask)
        for variable, value in zip(variables, updated):
            if value is not None:  # the dropout seeds advanced inside the block
                variable.assign(value)
        return outputs


def enable_remat(model):
    """Rematerializes the activations of every keras-hub `TransformerEncoder` in `model`.

    Call it before `compile`/`fit`. JAX backend only. It is a training
    setting, like `jit_compile`: keras-hub backbones rebuild plain blocks when
    loaded, so enable it again before training a loaded model.

    Args:
        model: A Keras model holding keras-hub `TransformerEncoder` blocks,
            e.g. a `BertBackbone` or a classifier built on one.

    Returns:
        `model`, changed in place.
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"enable_remat needs the JAX backend (it uses jax.checkpoint), but Keras runs "
            f"on {keras.backend.backend()!r}. Set KERAS_BACKEND=jax, or train without it.")
    swap_classes(model, {keras_hub.layers.TransformerEncoder: TransformerEncoder})
    if not any(type(layer) is TransformerEncoder
               for layer in model._flatten_layers(include_self=True)):
        raise ValueError(
            f"{model.name!r} holds no keras_hub.layers.TransformerEncoder to rematerialize; "
            f"pass a keras-hub BERT/DistilBERT backbone or a model built on one.")
    return model


def disable_remat(model):
    """Turns `model`'s rematerializing blocks back into keras-hub `TransformerEncoder`s."""
    swap_classes(model, {TransformerEncoder: keras_hub.layers.TransformerEncoder})
    return model
