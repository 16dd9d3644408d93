"""Writes files with klora 0.1.0 (commit c66ab15) for the compatibility tests.

    KERAS_BACKEND=jax python written_by.py OUT_DIR KLORA_0.1.0_CHECKOUT
"""
import os, sys
os.environ.setdefault("KERAS_BACKEND", "jax")
import keras, keras_hub, numpy as np
sys.path.insert(0, sys.argv[2])  # a checkout of klora 0.1.0
import klora
from klora.tasks import TokenClassifier
from klora.training.checkpoint import ResumableTraining
from klora.training.fine_tune import adamw_with_warmup

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
keras.utils.set_random_seed(7)
cfg = dict(vocabulary_size=40, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=16)
rng = np.random.default_rng(0)
ids = rng.integers(1, 40, (4, 6)).astype("int32")
mask = np.ones((4, 6), "int32"); mask[0, -2:] = 0
xb = {"token_ids": ids, "padding_mask": mask, "segment_ids": np.zeros_like(ids)}
xd = {"token_ids": ids, "padding_mask": mask}
expected = {}

def randomize(model, seed):
    r = np.random.default_rng(seed)
    for l in klora.adapted_layers(model):
        if l.active_adapter is not None:
            l.lora_b.assign(r.normal(size=l.lora_b.shape).astype("float32"))

# 1. BERT text classifier, q+v r=2 alpha 4, dropout 0.1, trained head -> .keras + adapter folder
bb = keras_hub.models.BertBackbone(**cfg)
clf = keras_hub.models.BertTextClassifier(backbone=bb, num_classes=3, preprocessor=None)
clf.save(f"{out}/bert_classifier_base.keras")
klora.apply(clf.backbone, rank=2, alpha=4, dropout=0.1, seed=3)
randomize(clf, 1)
clf.compile(optimizer=adamw_with_warmup(1e-3, 4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
training = ResumableTraining(f"{out}/checkpoints", monitor="loss", mode="min")
clf.fit(xb, np.arange(4) % 3, epochs=2, verbose=0, callbacks=[training])
expected["bert_classifier"] = keras.ops.convert_to_numpy(clf(xb))
clf.save(f"{out}/bert_classifier_lora.keras")
klora.save_adapter(clf, f"{out}/bert_classifier_adapter", metadata={"labels": ["a", "b", "c"], "base_model": "tiny", "max_length": 16})

# 2. DistilBERT backbone, all-linear r=2, rslora, named adapter -> .keras + adapter
db = keras_hub.models.DistilBertBackbone(**cfg)
db.save(f"{out}/distil_backbone_base.keras")
klora.apply(db, rank=2, alpha=3, targets="all-linear", use_rslora=True, seed=5, adapter_name="x")
randomize(db, 2)
expected["distil_backbone"] = keras.ops.convert_to_numpy(db(xd))
db.save(f"{out}/distil_backbone_lora.keras")
klora.save_adapter(db, f"{out}/distil_backbone_adapter")

# 3. klora TokenClassifier on BERT, value+query r=2 and rank-4 key (mixed ranks)
tb = keras_hub.models.BertBackbone(**cfg)
tagger = TokenClassifier(tb, num_tags=5)
tagger.save(f"{out}/bert_tagger_base.keras")
klora.apply(tagger.backbone, rank=2, targets=("query", "value"), seed=1)
klora.apply(tagger.backbone, rank=4, alpha=8, targets=("key",), adapter_name="default2")
klora.set_adapter(tagger.backbone, "default2")
randomize(tagger, 3)
klora.set_adapter(tagger.backbone, "default")
randomize(tagger, 4)
expected["bert_tagger"] = keras.ops.convert_to_numpy(tagger(xb))
tagger.save(f"{out}/bert_tagger_lora.keras")
klora.save_adapter(tagger, f"{out}/bert_tagger_adapter", metadata={"task": "ner", "tags": list("OABCD")})
klora.merge(tagger.backbone)
expected["bert_tagger_merged"] = keras.ops.convert_to_numpy(tagger(xb))
tagger.save(f"{out}/bert_tagger_merged.keras")

np.savez(f"{out}/expected.npz", token_ids=ids, padding_mask=mask, **expected)
print("written", sorted(os.listdir(out)))
