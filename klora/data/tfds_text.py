"""Text-classification sets from tensorflow-datasets, without ever hanging offline.

`tfds.load` on a machine without network retries its download for minutes.
`load_tfds_text` uses a prepared copy when there is one, and otherwise checks
in a few seconds that the download server is reachable before asking tfds.

>>> texts, labels, names = load_tfds_text("glue/sst2", "train")
"""

import socket

DOWNLOAD_HOST = ("storage.googleapis.com", 443)


def _reachable(address, timeout=3.0):
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def prepared_builder(name, split, data_dir=None, data_hint="a local file"):
    """The tfds builder of `name`, prepared and holding `split`; fails in seconds when
    preparing it needs a download."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(
            f"--data {name} needs tensorflow-datasets (pip install tensorflow-datasets "
            f"importlib_resources), or pass {data_hint}."
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise ValueError(f"Unknown tensorflow-datasets name '{name}': {e}") from None
    if not builder.is_prepared():
        if not _reachable(DOWNLOAD_HOST):
            raise ValueError(
                f"Dataset '{name}' is not prepared in {builder.data_dir} and there is no "
                f"network to download it. Pass {data_hint} instead, or prepare it on a "
                f"machine with network (`tfds build {name}`) and copy the folder."
            )
        builder.download_and_prepare()
    if split not in builder.info.splits:
        raise ValueError(f"Dataset '{name}' has no split '{split}'; it has "
                         f"{list(builder.info.splits)}.")
    return builder


def load_tfds_text(name, split, text_feature=None, label_feature=None, data_dir=None):
    """Returns `(texts, label_ids, label_names)` of one split of a tfds dataset.

    The text feature defaults to the dataset's only `Text` feature and the label
    to its only `ClassLabel` feature; name them when there are several.
    """
    builder = prepared_builder(
        name, split, data_dir,
        "a local file (--data train.tsv --text-column sentence --label-column label)")
    import tensorflow_datasets as tfds

    features = builder.info.features
    text_feature = text_feature or _only(features, tfds.features.Text, name, "--text-column")
    label_feature = label_feature or _only(features, tfds.features.ClassLabel, name, "--label-column")
    for feature, flag in ((text_feature, "--text-column"), (label_feature, "--label-column")):
        if feature not in features:
            raise ValueError(f"Dataset '{name}' has no feature '{feature}' ({flag}); it has {list(features)}.")
    texts, labels = [], []
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
        texts.append(example[text_feature].decode("utf-8"))
        labels.append(int(example[label_feature]))
    return texts, labels, list(features[label_feature].names)


def _only(features, kind, name, flag):
    found = [k for k, v in features.items() if isinstance(v, kind)]
    if len(found) != 1:
        raise ValueError(f"Dataset '{name}' has features {list(features)}: name the one to use with {flag}.")
    return found[0]
