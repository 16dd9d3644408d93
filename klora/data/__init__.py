from klora.data.labelled_text import (build_label_map, encode_labels, read_labelled_text,
                                      read_lines, split_off)
from klora.data.text_classification import (TextClassificationSplits, load_labelled_set,
                                            load_text_classification)
from klora.data.tfds_text import load_tfds_text
from klora.data.token_batches import TokenBatches
