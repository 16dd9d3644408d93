"""An extractive question-answering model: start and end logits over the tokens.

>>> reader = SpanExtractor(backbone)
>>> klora.apply(reader.backbone, rank=16, targets="all-linear")
>>> reader.compile(optimizer="adam", loss=SpanLoss())
>>> logits = reader.predict(batch)        # (batch, sequence, 2): [..., 0] start, [..., 1] end
"""

import keras

from klora.tasks.encoder_task import EncoderTask, head_initializer, sequence_output

MASKED = -1e4  # fits float16 and bfloat16


@keras.saving.register_keras_serializable(package="klora")
class SpanExtractor(EncoderTask):
    """Backbone sequence output -> dropout -> `Dense(2)` named `span_logits`.

    Padding positions get a large negative logit, so they are never chosen.
    Labels for `SpanLoss` are `(batch, 2)` token positions `[start, end]`;
    position 0 (`[CLS]`) means "no answer in this window".

    Args:
        backbone: A keras-hub encoder backbone (BERT, DistilBERT, ...).
        dropout: Dropout rate before the head.

    Output: logits of shape `(batch, sequence, 2)`.
    """

    config_fields = ("dropout",)
    peft_task_type = "QUESTION_ANS"  # transformers' *ForQuestionAnswering

    def __init__(self, backbone, dropout=0.1, **kwargs):
        inputs = backbone.input
        x = sequence_output(backbone, inputs)
        x = keras.layers.Dropout(dropout, name="span_dropout")(x)
        logits = keras.layers.Dense(2, kernel_initializer=head_initializer(),
                                    name="span_logits")(x)
        mask = keras.ops.expand_dims(keras.ops.cast(inputs["padding_mask"], logits.dtype), -1)
        logits = logits * mask + (1.0 - mask) * MASKED
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone, self.dropout = backbone, dropout


@keras.saving.register_keras_serializable(package="klora")
class SpanLoss(keras.losses.Loss):
    """Mean of the start and end position cross-entropies (softmax over the sequence)."""

    def __init__(self, name="span_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        logits = keras.ops.transpose(y_pred, (0, 2, 1))        # (batch, 2, sequence)
        losses = keras.losses.sparse_categorical_crossentropy(
            keras.ops.cast(y_true, "int32"), logits, from_logits=True)
        return keras.ops.mean(losses)
