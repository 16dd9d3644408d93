"""The safetensors reader follows the format's specification strictly, and every malformed
adapter file (thousands of random corruptions included) raises a `ValueError` naming the file,
leaving the model untouched."""

import json
import os
import struct

import numpy as np
import pytest

import klora
from klora.peft.safetensors import read_safetensors, write_safetensors
from tests.conftest import randomize_adapters, tiny_bert, to_numpy


def raw_file(header, body=b"", pad=b""):
    text = json.dumps(header).encode() if isinstance(header, (dict, list)) else header
    return struct.pack("<Q", len(text + pad)) + text + pad + body


F32 = np.arange(6, dtype="<f4").tobytes()
GOOD = {"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}


def test_a_valid_file_reads_back(tmp_path):
    (tmp_path / "ok").write_bytes(raw_file({**GOOD, "__metadata__": {"a": "b"}}, F32, b"  "))
    tensors, metadata = read_safetensors(tmp_path / "ok")
    np.testing.assert_array_equal(tensors["t"], np.arange(6).reshape(2, 3))
    assert metadata == {"a": "b"}
    data = write_safetensors({"x": np.ones((2, 2))}, {"k": "v"})
    (tmp_path / "w").write_bytes(data)
    assert read_safetensors(tmp_path / "w")[1] == {"k": "v"}


BAD = {
    "string offsets": ({"t": {**GOOD["t"], "data_offsets": ["0", "24"]}}, F32, "data_offsets"),
    "float offsets": ({"t": {**GOOD["t"], "data_offsets": [0.0, 24.0]}}, F32, "data_offsets"),
    "list dtype": ({"t": {**GOOD["t"], "dtype": ["F32"]}}, F32, "non-string dtype"),
    "int dtype": ({"t": {**GOOD["t"], "dtype": "I32"}}, F32, "floating point"),
    "float shape": ({"t": {**GOOD["t"], "shape": [2.0, 3]}}, F32, "list of non-negative"),
    "bool shape": ({"t": {**GOOD["t"], "shape": [True, 6]}}, F32, "list of non-negative"),
    "negative shape": ({"t": {**GOOD["t"], "shape": [-2, -3]}}, F32, "list of non-negative"),
    "string shape": ({"t": {**GOOD["t"], "shape": "2,3"}}, F32, "list of non-negative"),
    "extra field": ({"t": {**GOOD["t"], "x": 1}}, F32, "exactly"),
    "missing field": ({"t": {"dtype": "F32", "shape": [6]}}, F32, "exactly"),
    "entry not object": ({"t": [1, 2]}, F32, "exactly"),
    "non-string metadata": ({**GOOD, "__metadata__": {"a": 1}}, F32, "strings to strings"),
    "metadata list": ({**GOOD, "__metadata__": ["a"]}, F32, "strings to strings"),
    "header list": ([1, 2], F32, "does not start with"),
    "wrong size": ({"t": {**GOOD["t"], "shape": [2, 2]}}, F32, "needs 16 bytes"),
    "past the end": ({"t": {**GOOD["t"], "data_offsets": [24, 48]}}, F32, "data_offsets"),
    "gap": ({"t": {**GOOD["t"], "data_offsets": [4, 28]}}, F32 + b"1234", "not at 0"),
    "overlap": ({"t": GOOD["t"], "u": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}},
                F32, "not at 24"),
    "trailing bytes": (GOOD, F32 + b"xxxx", "belong to no tensor"),
    "duplicate key": (b'{"t": ' + json.dumps(GOOD["t"]).encode() + b', "t": '
                      + json.dumps(GOOD["t"]).encode() + b"}", F32, "duplicate keys"),
    "nan": (GOOD, np.array([0, 1, np.nan, 3, 4, 5], "<f4").tobytes(), "NaN or infinite"),
    "inf": (GOOD, np.array([0, 1, np.inf, 3, 4, 5], "<f4").tobytes(), "NaN or infinite"),
    "deep nesting": (b"{" + b'"a": [' * 100000 + b"]" * 100000 + b"}", b"", "unreadable header"),
    "not utf-8": (b'{"\xff": 1}', b"", "unreadable header"),
    "not json": (b"{nope", b"", "unreadable header"),
    "empty name": ({"": GOOD["t"]}, F32, "empty name"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_files_raise_value_error_naming_the_file(case, tmp_path):
    header, body, message = BAD[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_file(header, body))
    with pytest.raises(ValueError, match=message) as error:
        read_safetensors(path)
    assert str(path) in str(error.value)


def test_short_or_oversized_headers(tmp_path):
    path = tmp_path / "bad.safetensors"
    for data, message in ((b"\x01\x02", "only 2 bytes"),
                          (struct.pack("<Q", 2**40) + b"{}", "a header of"),
                          (raw_file(GOOD, F32)[:-3], "truncated")):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_safetensors(path)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A saved BERT adapter and the plain model state to load it into."""
    directory = tmp_path_factory.mktemp("mutations")
    backbone = tiny_bert()
    weights = backbone.get_weights()
    klora.apply(backbone, rank=2, alpha=4, targets=("query", "value"), seed=1)
    randomize_adapters(backbone)
    klora.save_adapter(backbone, directory / "adapter")
    return directory, weights


def mutate_bytes(data, rng):
    """Flipped bytes, a cut or an insertion anywhere."""
    data = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:
        for i in rng.integers(0, len(data), rng.integers(1, 4)):
            data[i] = rng.integers(256)
    elif kind == 1:
        data = data[: rng.integers(0, len(data))]
    else:
        at = rng.integers(0, len(data))
        data[at:at] = bytes(rng.integers(0, 256, rng.integers(1, 9)).tolist())
    return bytes(data)


def mutate(data, rng):
    """One random corruption of a safetensors file: bytes anywhere, or the header."""
    data = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    kind = rng.integers(6)
    if kind < 3:
        return mutate_bytes(data, rng)
    if kind == 3:  # flip bytes inside the JSON header
        for i in rng.integers(8, header_end, rng.integers(1, 4)):
            data[i] = rng.choice(list(b'{}[]":,0123456789-eE. aFx'))
    elif kind == 4:  # change the declared header length
        data[:8] = int(rng.integers(0, 2 * header_end)).to_bytes(8, "little")
    else:  # swap two header tokens
        text = bytes(data[8:header_end])
        a, b = sorted(rng.integers(0, len(text), 2))
        text = text[:a] + text[b:b + 5] + text[a + 5:b] + text[a:a + 5] + text[b + 5:]
        data[8:header_end] = text[: header_end - 8].ljust(header_end - 8)
    return bytes(data)


def mutate_json(data, rng):
    """A generic byte corruption, or a field set to a value of another type, or removed."""
    if rng.integers(3):
        return mutate_bytes(data, rng)
    config = json.loads(data)
    key = sorted(config)[rng.integers(len(config))]
    values = [None, -1, 0, 1.5, "x", [], {}, True, 10**30, {"a": [1]}, "gaussian", "pissa",
              float("nan"), [None]]
    if rng.integers(4):
        config[key] = values[rng.integers(len(values))]
    else:
        del config[key]
    return json.dumps(config).encode()


def test_thousands_of_corrupted_weight_files(adapter, tmp_path):
    """Reading a corrupted file either succeeds or raises ValueError naming it."""
    directory, _ = adapter
    valid = (directory / "adapter" / "adapter_model.safetensors").read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "m.safetensors"
    outcomes = {"ok": 0, "ValueError": 0}
    for _ in range(3000):
        path.write_bytes(mutate(valid, rng))
        try:
            tensors, _ = read_safetensors(path)
        except ValueError as e:
            assert str(path) in str(e)
            outcomes["ValueError"] += 1
        else:
            assert all(np.isfinite(t).all() for t in tensors.values())
            outcomes["ok"] += 1
    assert outcomes["ValueError"] > 1500  # most corruptions are caught


def test_corrupted_adapters_never_change_the_model(adapter, tmp_path):
    """Through load_adapter: a ValueError naming a file, and the model as it was."""
    directory, weights = adapter
    files = {name: (directory / "adapter" / name).read_bytes()
             for name in ("adapter_model.safetensors", "adapter_config.json")}
    model = tiny_bert()
    model.set_weights(weights)
    before = [to_numpy(w).copy() for w in model.weights]
    rng = np.random.default_rng(1)
    target = tmp_path / "adapter"
    target.mkdir()
    loaded = 0
    for i in range(400):
        name = ("adapter_model.safetensors", "adapter_config.json")[i % 2]
        corrupt = mutate if name.endswith("safetensors") else mutate_json
        for other, data in files.items():
            (target / other).write_bytes(corrupt(data, rng) if other == name else data)
        try:
            klora.load_adapter(model, target)
        except ValueError as e:
            assert str(target) in str(e), e
            assert not klora.adapted_layers(model)
            after = [to_numpy(w) for w in model.weights]
            assert all(np.array_equal(a, b) for a, b in zip(after, before))
        else:
            loaded += 1
            klora.delete_adapter(model, "default")  # back to the plain model
    assert loaded < 200


@pytest.mark.parametrize("pattern, message", [
    ({"(unclosed": 4}, "not a valid regular expression"),
    ({"query": "four"}, "values are numbers"),
    ({"(.|..)*(?<=z)": 4}, "takes too long"),  # exponential backtracking
])
def test_rank_patterns_are_checked_and_bounded(adapter, tmp_path, pattern, message):
    directory, weights = adapter
    target = tmp_path / "adapter"
    os.makedirs(target)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (target / name).write_bytes((directory / "adapter" / name).read_bytes())
    config = json.loads((target / "adapter_config.json").read_text())
    config["rank_pattern"] = pattern
    (target / "adapter_config.json").write_text(json.dumps(config))
    tensors, metadata = read_safetensors(target / "adapter_model.safetensors")
    metadata.pop("klora")  # as PEFT writes it: no hash of the config
    (target / "adapter_model.safetensors").write_bytes(write_safetensors(tensors, metadata))
    model = tiny_bert()
    model.set_weights(weights)
    with pytest.raises(ValueError, match=message):
        klora.load_adapter(model, target)
    assert not klora.adapted_layers(model)
