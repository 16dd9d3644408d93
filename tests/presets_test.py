"""Tokenizers loaded from presets split text as the model's own tokenizer does."""

import keras_hub
import pytest

from klora.data.token_batches import token_lists
from klora.presets import load_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cliches", "cliche", "clich",
         "##es", "##e", "##és", "##é", "resume", "res", "##um", "naive", "zurich", "a", "."]
TEXTS = ["The clichés", "a Résumé .", "naïve ZÜRICH", "the cliches", "café"]


def hf_folder(directory, arch, strip_accents):
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    if arch == "bert":
        tokenizer = transformers.BertTokenizer(str(vocab), do_lower_case=True,
                                               strip_accents=strip_accents)
        config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=8,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=16)
        model = transformers.BertModel(config)
    else:
        tokenizer = transformers.DistilBertTokenizer(str(vocab), do_lower_case=True,
                                                     strip_accents=strip_accents)
        config = transformers.DistilBertConfig(vocab_size=len(WORDS), dim=8, n_layers=1,
                                               n_heads=2, hidden_dim=16,
                                               max_position_embeddings=16)
        model = transformers.DistilBertModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory), tokenizer


@pytest.mark.parametrize("arch", ["bert", "distil_bert"])
@pytest.mark.parametrize("strip_accents", [None, False])
def test_hugging_face_folder_tokenizes_as_transformers(tmp_path, arch, strip_accents):
    folder, reference = hf_folder(tmp_path, arch, strip_accents)
    expected = reference(TEXTS, add_special_tokens=False)["input_ids"]
    assert token_lists(load_tokenizer(folder), TEXTS) == expected
    if strip_accents is None:  # the case that differs from keras-hub's own converter
        assert expected[0] == [WORDS.index("the"), WORDS.index("cliches")]


@pytest.mark.parametrize("lowercase", [True, False])
def test_keras_hub_preset_uncased_strips_accents_like_bert(tmp_path, lowercase):
    keras_hub.models.BertBackbone(vocabulary_size=len(WORDS), num_layers=1, num_heads=2,
                                  hidden_dim=8, intermediate_dim=16,
                                  max_sequence_length=16).save_to_preset(str(tmp_path))
    keras_hub.models.BertTokenizer(vocabulary=WORDS, lowercase=lowercase).save_to_preset(
        str(tmp_path))
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.strip_accents == lowercase
    ids = token_lists(tokenizer, ["clichés"])[0]
    assert ids == ([WORDS.index("cliches")] if lowercase else
                   [WORDS.index("clich"), WORDS.index("##és")])
