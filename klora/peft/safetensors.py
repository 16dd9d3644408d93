"""Reading and writing safetensors files, strictly by the format's specification.

A file is an 8-byte little-endian header length, a UTF-8 JSON header, then
the tensors' bytes. The header maps each tensor name (unique) to its `dtype`,
integer `shape` and `data_offsets` `[begin, end]` into the data; the tensors
cover the data exactly, without gaps or overlaps. An optional `__metadata__`
maps strings to strings. Reading is pure parsing, so nothing is executed.

`read_safetensors` checks all of that, and that adapter values are finite
floating-point numbers, and raises a `ValueError` naming the file and the
problem for anything else.

>>> tensors, metadata = read_safetensors("adapter/adapter_model.safetensors")
"""

import json
import math

import numpy as np
from safetensors.numpy import save

MAX_HEADER_BYTES = 100 * 2**20
DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}
ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


def write_safetensors(tensors, metadata):
    """The bytes of a safetensors file of float32 `tensors` and `metadata` (str -> str)."""
    return save({k: np.ascontiguousarray(v, "float32") for k, v in tensors.items()},
                metadata=metadata)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate keys {duplicates[:3]}")
    return dict(pairs)


def _parse_header(raw):
    if not raw.startswith(b"{"):
        raise ValueError("the header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"unreadable header ({type(e).__name__})") from None
    except ValueError as e:
        raise ValueError(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _entry(name, info, data_size):
    """`(dtype, shape, begin, end)` of one header entry, checked."""
    if not name:
        raise ValueError("a tensor has an empty name")
    if not isinstance(info, dict) or set(info) != ENTRY_FIELDS:
        raise ValueError(f"the entry of tensor '{name}' must hold exactly {sorted(ENTRY_FIELDS)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise ValueError(f"tensor '{name}' has a non-string dtype {dtype!r}")
    if dtype not in DTYPES:
        raise ValueError(f"tensor '{name}' has dtype {dtype}; adapters are floating point "
                         f"({sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor '{name}' has shape {shape!r}; a shape is a list of "
                         "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"tensor '{name}' has data_offsets {offsets!r}; they must be two "
                         f"integers 0 <= begin <= end <= {data_size} (truncated file?)")
    size = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != size:
        raise ValueError(f"tensor '{name}' of shape {shape} and dtype {dtype} needs {size} "
                         f"bytes but its data_offsets span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _parse(data):
    if len(data) < 8:
        raise ValueError(f"only {len(data)} bytes")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise ValueError(f"a header of {header_size} bytes in a file of {len(data)} "
                         "(truncated or not safetensors?)")
    header = _parse_header(data[8:8 + header_size])
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("`__metadata__` must map strings to strings")
    body = memoryview(data)[8 + header_size:]
    entries = {name: _entry(name, info, len(body)) for name, info in header.items()}
    end = 0
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if begin != end:
            raise ValueError(f"the data of tensor '{name}' starts at byte {begin}, not at "
                             f"{end}: tensors must cover the data without gaps or overlaps")
        end = stop
    if end != len(body):
        raise ValueError(f"{len(body) - end} bytes of data belong to no tensor")
    tensors = {}
    for name, (dtype, shape, begin, stop) in entries.items():
        array = np.frombuffer(body[begin:stop], dtype=DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            array = (array.astype("<u4") << 16).view("<f4")
        array = array.astype("float32")
        if not np.isfinite(array).all():
            raise ValueError(f"tensor '{name}' holds NaN or infinite values")
        tensors[name] = array
    return tensors, metadata


def read_safetensors(filename):
    """`(tensors, metadata)` of a safetensors file: float32 arrays and a str -> str dict.

    Raises a `ValueError` naming `filename` and the problem for a file that
    is unreadable or does not follow the format.
    """
    try:
        with open(filename, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"Cannot read '{filename}': {e.strerror or e}.") from None
    try:
        return _parse(data)
    except ValueError as e:
        raise ValueError(f"'{filename}' is not a valid safetensors file: {e}.") from None
