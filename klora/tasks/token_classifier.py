"""A token-classification (e.g. NER) model over a keras-hub encoder backbone.

>>> backbone = keras_hub.models.BertBackbone.from_preset("bert_tiny_en_uncased")
>>> tagger = TokenClassifier(backbone, num_tags=9)
>>> klora.apply(tagger.backbone, rank=8, targets="all-linear")
>>> tagger.compile(optimizer="adam", loss=MaskedTokenCrossentropy())
>>> logits = tagger.predict(batch)          # (batch, sequence, num_tags)
"""

import keras

from klora.data.word_alignment import IGNORE
from klora.tasks.encoder_task import EncoderTask, head_initializer, sequence_output


@keras.saving.register_keras_serializable(package="klora")
class TokenClassifier(EncoderTask):
    """Backbone sequence output -> dropout -> `Dense(num_tags)` named `token_logits`.

    Args:
        backbone: A keras-hub encoder backbone (BERT, DistilBERT, ...).
        num_tags: Number of tags (classes per token).
        dropout: Dropout rate before the head.

    Inputs: the backbone's inputs (`token_ids`, `padding_mask`[, `segment_ids`]).
    Output: logits of shape `(batch, sequence, num_tags)`.
    """

    config_fields = ("num_tags", "dropout")
    peft_task_type = "TOKEN_CLS"  # transformers' *ForTokenClassification

    def __init__(self, backbone, num_tags, dropout=0.1, **kwargs):
        inputs = backbone.input
        x = sequence_output(backbone, inputs)
        x = keras.layers.Dropout(dropout, name="token_dropout")(x)
        logits = keras.layers.Dense(num_tags, kernel_initializer=head_initializer(),
                                    name="token_logits")(x)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone, self.num_tags, self.dropout = backbone, num_tags, dropout


@keras.saving.register_keras_serializable(package="klora")
class MaskedTokenCrossentropy(keras.losses.Loss):
    """Mean sparse cross-entropy over tokens whose label is not `ignore_index` (-100).

    >>> loss = MaskedTokenCrossentropy()
    >>> loss(labels, logits)      # labels (batch, seq) ints, logits (batch, seq, classes)
    """

    def __init__(self, ignore_index=IGNORE, name="masked_token_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_index = ignore_index

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(y_true, "int32")
        mask = keras.ops.not_equal(y_true, self.ignore_index)
        labels = keras.ops.where(mask, y_true, 0)
        losses = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        mask = keras.ops.cast(mask, losses.dtype)
        return keras.ops.sum(losses * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)

    def get_config(self):
        return {**super().get_config(), "ignore_index": self.ignore_index}
