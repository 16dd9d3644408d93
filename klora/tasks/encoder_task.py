"""What klora's task models share: a keras-hub encoder backbone with a head on its
per-token output, saved and loaded with the backbone inside their config."""

import keras


def sequence_output(backbone, inputs):
    """Per-token features: BERT returns a dict with `sequence_output`, DistilBERT a tensor."""
    outputs = backbone(inputs)
    return outputs["sequence_output"] if isinstance(outputs, dict) else outputs


def head_initializer():
    """BERT's initializer for new dense layers (`initializer_range` 0.02)."""
    return keras.initializers.TruncatedNormal(stddev=0.02)


class EncoderTask(keras.Model):
    """A functional model over `backbone` whose config holds the backbone and the fields
    named in `config_fields` (the subclass's constructor arguments)."""

    config_fields = ()
    # The backbone's pooler computes nothing these tasks use (transformers' token and
    # span models have none): `klora.apply(..., targets="all-linear")` leaves it out.
    unused_backbone_layers = ("pooled_dense",)

    def get_config(self):
        return {"backbone": keras.layers.serialize(self.backbone),
                **{name: getattr(self, name) for name in self.config_fields},
                "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)
