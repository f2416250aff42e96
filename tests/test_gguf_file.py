"""The pure-Python GGUF header reader, checked against the reference ``gguf`` package.

Files are written by gguf-py's GGUFWriter and read back both by gguf-py's GGUFReader
and by edgebundle.gguf_file; the two must agree on every key, tensor and offset.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgebundle.errors import ModelError
from edgebundle.gguf_file import GGML_TYPES, read_gguf

COMMON_TYPES = (
    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K "
    "IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ1_S IQ1_M IQ4_NL IQ4_XS I8 I16 I32 I64 F64"
).split()

METADATA: dict[str, tuple[str, object]] = {
    "t.u8": ("add_uint8", 200),
    "t.i8": ("add_int8", -100),
    "t.u16": ("add_uint16", 60000),
    "t.i16": ("add_int16", -30000),
    "t.u32": ("add_uint32", 4_000_000_000),
    "t.i32": ("add_int32", -2_000_000_000),
    "t.u64": ("add_uint64", 2**63 + 5),
    "t.i64": ("add_int64", -(2**62)),
    "t.f32": ("add_float32", 0.5),
    "t.f64": ("add_float64", 1e-300),
    "t.bool": ("add_bool", True),
    "t.str": ("add_string", "{% for m in messages %}<|eot_id|>ünïcode{% endfor %}"),
    "t.arr_int": ("add_array", [1, -2, 3]),
    "t.arr_float": ("add_array", [0.25, -1.5]),
    "t.arr_str": ("add_array", ["<s>", "</s>", "▁hello", ""]),
    "t.arr_bool": ("add_array", [True, False]),
}


def _write(
    path: Path, endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE, alignment: int | None = None
) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="llama", endianess=endian)
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, (method, value) in METADATA.items():
        getattr(writer, method)(key, value)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.random((8, 64), dtype=np.float32))
    writer.add_tensor("f16", rng.random((3, 32)).astype(np.float16))
    writer.add_tensor("i32", np.arange(7, dtype=np.int32))
    # Quantized tensors are raw bytes: shape (rows, bytes per row) with raw_dtype.
    q40 = gguf.GGMLQuantizationType.Q4_0
    writer.add_tensor("q4_0", np.zeros((2, 2 * 18), dtype=np.uint8), raw_dtype=q40)
    q4k = gguf.GGMLQuantizationType.Q4_K
    writer.add_tensor("q4_k", np.zeros((3, 144), dtype=np.uint8), raw_dtype=q4k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reader_agrees_with_gguf_py(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf")
    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert ours.version == 3
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # its pseudo-keys
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():
        expected = field.contents()
        got = ours.metadata[key]
        if isinstance(expected, float):
            assert got == pytest.approx(expected)
        elif isinstance(expected, list) and expected and isinstance(expected[0], float):
            assert got == pytest.approx(expected)
        else:
            assert got == expected, key
    assert ours.metadata["t.str"] == METADATA["t.str"][1]
    assert ours.metadata["t.arr_str"] == ["<s>", "</s>", "▁hello", ""]
    assert ours.metadata["t.u64"] == 2**63 + 5
    assert ours.data_offset == ref.data_offset
    assert ours.alignment == 32
    assert len(ours.tensors) == len(ref.tensors)
    for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
        assert mine.name == theirs.name
        assert list(mine.dims) == [int(d) for d in theirs.shape]
        assert mine.ggml_type == int(theirs.tensor_type)
        assert ours.data_offset + mine.offset == theirs.data_offset
        assert mine.nbytes == theirs.n_bytes
    last = ref.tensors[-1]
    assert ours.expected_size == last.data_offset + last.n_bytes
    assert ours.file_size == path.stat().st_size >= ours.expected_size
    assert ours.architecture == "llama"
    assert [t.type_name for t in ours.tensors] == ["F32", "F16", "I32", "Q4_0", "Q4_K"]


def test_big_endian_and_custom_alignment(tmp_path: Path) -> None:
    path = _write(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG, alignment=64)
    ours = read_gguf(path)
    assert ours.big_endian and ours.alignment == 64
    assert ours.data_offset % 64 == 0
    assert ours.metadata["t.i32"] == -2_000_000_000
    assert ours.metadata["t.arr_int"] == [1, -2, 3]
    assert ours.tensors[0].dims == (64, 8)


def test_version_2_files_read_like_version_3(tmp_path: Path) -> None:
    path = _write(tmp_path / "v2.gguf")
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 4, 2)
    path.write_bytes(bytes(data))
    assert read_gguf(path).version == 2


def test_version_1_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<III", 1, 0, 0))
    with pytest.raises(ModelError, match="version 1"):
        read_gguf(path)


def test_every_truncation_is_caught(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf")
    info = read_gguf(path)
    data = path.read_bytes()
    assert info.expected_size is not None
    # Inside the fixed header, the metadata, the tensor table, and the tensor data.
    cuts = [6, 20, 100, 400, info.data_offset - 10, info.data_offset + 5, info.expected_size - 1]
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated") as err:
            read_gguf(path)
        if cut >= info.data_offset:
            assert f"needs at least {info.expected_size} bytes, the file has {cut}" in str(
                err.value
            )
    path.write_bytes(data[: info.expected_size])  # the trailing padding is optional
    assert read_gguf(path).expected_size == info.expected_size


def test_not_gguf_is_refused(tmp_path: Path) -> None:
    for content in (b"", b"GG", b"\x7fELF\x02\x01\x01" + bytes(50), b"<html>404</html>"):
        path = tmp_path / "x.gguf"
        path.write_bytes(content)
        with pytest.raises(ModelError, match="not a GGUF file"):
            read_gguf(path)


def test_absurd_counts_are_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "c.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0) + bytes(64))
    with pytest.raises(ModelError, match="corrupt"):
        read_gguf(path)


def test_unknown_tensor_type_leaves_the_size_unknown(tmp_path: Path) -> None:
    """A hand-built file: one KV pair, one tensor of a type ggml does not (yet) have."""
    name = b"w"
    body = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    key, value = b"general.architecture", b"llama"
    body += struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(value)) + value
    body += struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 32, 999, 0)
    path = tmp_path / "u.gguf"
    path.write_bytes(body)
    info = read_gguf(path)
    assert info.expected_size is None and info.unknown_types == [999]
    assert info.tensors[0].type_name == "type 999" and info.tensors[0].nbytes is None


def test_type_table_covers_the_common_types_and_agrees_with_gguf_py() -> None:
    names = {t.name for t in GGML_TYPES.values()}
    assert set(COMMON_TYPES) <= names
    for type_id, ours in GGML_TYPES.items():
        ref = gguf.GGMLQuantizationType(type_id)
        assert ref.name == ours.name
        assert gguf.GGML_QUANT_SIZES[ref] == (ours.block_size, ours.type_size)
