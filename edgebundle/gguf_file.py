"""A small pure-Python reader of GGUF file headers (versions 2 and 3).

It reads what doctor and the chat layer need without loading a model: the metadata
(chat template, special token ids, tokenizer vocabulary) and the tensor table, from
which it computes how large the file must be. A download cut short still has a
perfect header, so the size check is what catches it before llama.cpp fails with
"tensor data is not within file bounds".

Layout (ggml/docs/gguf.md), all integers in the file's byte order (little endian, or
big endian for v3 files written for big-endian hosts)::

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x  (string key | u32 value_type | value)
    tensor_count x (string name | u32 n_dims | n_dims x u64 dim | u32 ggml_type | u64 offset)
    padding to general.alignment (default 32) | tensor data (offsets relative to here)

A string is a u64 byte length and UTF-8 bytes; an array is u32 element type, u64
count, then the elements. Version 1 (u32 counts) was dropped by llama.cpp in 2023.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebundle.errors import ModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_COUNT = 1 << 24


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


# ggml_type ids and (block size, bytes per block), from ggml/include/ggml.h and the
# type traits in ggml/src/ggml.c (mirrored by gguf-py's GGML_QUANT_SIZES). Ids 4, 5
# (Q4_2, Q4_3) and 31-33, 36-38 (repacked Q4_0_4_4 etc.) are gone from ggml.
GGML_TYPES: dict[int, GGMLType] = {
    t_id: GGMLType(name, block, size)
    for t_id, name, block, size in (
        (0, "F32", 1, 4),
        (1, "F16", 1, 2),
        (2, "Q4_0", 32, 18),
        (3, "Q4_1", 32, 20),
        (6, "Q5_0", 32, 22),
        (7, "Q5_1", 32, 24),
        (8, "Q8_0", 32, 34),
        (9, "Q8_1", 32, 40),
        (10, "Q2_K", 256, 84),
        (11, "Q3_K", 256, 110),
        (12, "Q4_K", 256, 144),
        (13, "Q5_K", 256, 176),
        (14, "Q6_K", 256, 210),
        (15, "Q8_K", 256, 292),
        (16, "IQ2_XXS", 256, 66),
        (17, "IQ2_XS", 256, 74),
        (18, "IQ3_XXS", 256, 98),
        (19, "IQ1_S", 256, 50),
        (20, "IQ4_NL", 32, 18),
        (21, "IQ3_S", 256, 110),
        (22, "IQ2_S", 256, 82),
        (23, "IQ4_XS", 256, 136),
        (24, "I8", 1, 1),
        (25, "I16", 1, 2),
        (26, "I32", 1, 4),
        (27, "I64", 1, 8),
        (28, "F64", 1, 8),
        (29, "IQ1_M", 256, 56),
        (30, "BF16", 1, 2),
        (34, "TQ1_0", 256, 54),
        (35, "TQ2_0", 256, 66),
        (39, "MXFP4", 32, 17),
    )
}

# GGUF metadata value types: id -> struct code (8 = string and 9 = array are special).
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, str] = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ne[0] first, as stored (ne[0] is the contiguous dimension)
    ggml_type: int
    offset: int  # relative to the start of the data section

    @property
    def type_name(self) -> str:
        known = GGML_TYPES.get(self.ggml_type)
        return known.name if known else f"type {self.ggml_type}"

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int | None:
        """Bytes of tensor data; None when the ggml type is not in :data:`GGML_TYPES`."""
        known = GGML_TYPES.get(self.ggml_type)
        if known is None:
            return None
        first = self.dims[0] if self.dims else 1
        rows = math.prod(self.dims[1:])
        return (first // known.block_size) * known.type_size * rows


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    metadata: dict[str, Any]  # strings as str, arrays as lists
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # where tensor data starts (aligned end of the header)
    expected_size: int | None  # the least size the file must have; None if a type is unknown
    file_size: int
    big_endian: bool = False

    @property
    def unknown_types(self) -> list[int]:
        return sorted({t.ggml_type for t in self.tensors if t.ggml_type not in GGML_TYPES})

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _Cursor:
    """Reads GGUF values from a buffer, in one byte order, with bounds checks."""

    def __init__(self, buf: mmap.mmap | bytes, order: str) -> None:
        self.buf, self.order, self.pos, self.size = buf, order, 0, len(buf)

    def _take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated
        self.pos = start + n
        return start

    def scalar(self, code: str) -> Any:
        size = struct.calcsize(code)
        return struct.unpack_from(self.order + code, self.buf, self._take(size))[0]

    def u32(self) -> int:
        return int(self.scalar("I"))

    def u64(self) -> int:
        return int(self.scalar("Q"))

    def string(self) -> str:
        length = self.u64()
        start = self._take(length)
        # GGUF strings are UTF-8; a few old vocabularies hold stray bytes: keep the rest.
        return self.buf[start : start + length].decode("utf-8", "replace")

    def value(self, value_type: int, where: str) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array(where)
        raise ModelError(f"unknown GGUF value type {value_type} for {where}")

    def array(self, where: str) -> list[Any]:
        item_type = self.u32()
        count = self.u64()
        if item_type in _SCALARS:
            code = _SCALARS[item_type]
            size = struct.calcsize(code) * count
            start = self._take(size)
            # One unpack for the whole array: vocabularies have ~10^5 entries.
            return list(struct.unpack_from(f"{self.order}{count}{code}", self.buf, start))
        if count > self.size - self.pos:  # every element takes at least one byte
            raise _Truncated
        if item_type == _STRING:
            return [self.string() for _ in range(count)]
        return [self.value(item_type, where) for _ in range(count)]


def _byte_order(version_bytes: bytes) -> tuple[int, str]:
    little = int.from_bytes(version_bytes, "little")
    if little in SUPPORTED_VERSIONS:
        return little, "<"
    big = int.from_bytes(version_bytes, "big")
    if big in SUPPORTED_VERSIONS:
        return big, ">"
    return little, "<"


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def read_gguf(path: Path) -> GGUFInfo:
    """Read the header of the GGUF file at ``path`` and check the file is long enough.

    Raises ModelError when the file is not GGUF, uses an unsupported version, is
    corrupt, or is shorter than its tensor table says; OSError when it cannot be read.
    """
    with path.open("rb") as fh:
        head = fh.read(8)
        if head[:4] != GGUF_MAGIC:
            shown = head[:4].hex(" ") if head else "empty file"
            raise ModelError(
                f"{path} is not a GGUF file (it starts with {shown}, not 'GGUF'); "
                "llama.cpp and WasmEdge's GGML backend need a .gguf model"
            )
        if len(head) < 8:
            raise ModelError(f"{path} is truncated: {len(head)} bytes, not even a GGUF header")
        version, order = _byte_order(head[4:8])
        if version == 1:
            raise ModelError(
                f"{path} is GGUF version 1, which llama.cpp no longer reads; download a "
                "current conversion of the model"
            )
        if version not in SUPPORTED_VERSIONS:
            raise ModelError(
                f"{path}: unsupported GGUF version {version} (this reader knows 2 and 3)"
            )
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(path, buf, version, order)
            except _Truncated:
                raise ModelError(
                    f"{path} is truncated: its GGUF header runs past the end of the file "
                    f"({len(buf)} bytes); download it again"
                ) from None


def _parse(path: Path, buf: mmap.mmap, version: int, order: str) -> GGUFInfo:
    file_size = len(buf)
    cur = _Cursor(buf, order)
    cur.pos = 8
    tensor_count, kv_count = cur.u64(), cur.u64()
    # Real models have ~10^3 tensors and ~10^2 keys; far bigger counts mean garbage.
    if tensor_count > MAX_COUNT or kv_count > MAX_COUNT:
        raise ModelError(
            f"{path} is corrupt: its GGUF header claims {tensor_count} tensors and "
            f"{kv_count} metadata entries"
        )
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.u32(), key)
    tensors = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise ModelError(f"{path} is corrupt: tensor {name!r} claims {n_dims} dimensions")
        dims = tuple(cur.u64() for _ in range(n_dims))
        tensors.append(TensorInfo(name=name, dims=dims, ggml_type=cur.u32(), offset=cur.u64()))
    alignment = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelError(f"{path}: {ALIGNMENT_KEY} must be a power of two, found {alignment!r}")
    header_end = cur.pos
    data_offset = _align(header_end, alignment)
    expected = _expected_size(path, tensors, data_offset, header_end)
    if expected is not None and file_size < expected:
        raise ModelError(
            f"{path} is truncated: its tensor table needs at least {expected} bytes, the file "
            f"has {file_size} ({expected - file_size} missing); download it again"
        )
    return GGUFInfo(
        path=path,
        version=version,
        metadata=metadata,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        expected_size=expected,
        file_size=file_size,
        big_endian=order == ">",
    )


def _expected_size(
    path: Path, tensors: list[TensorInfo], data_offset: int, header_end: int
) -> int | None:
    if not tensors:
        return header_end  # a vocabulary-only file may end right after its header
    end = data_offset
    for tensor in tensors:
        known = GGML_TYPES.get(tensor.ggml_type)
        if known is None:
            return None
        if tensor.dims and tensor.dims[0] % known.block_size:
            raise ModelError(
                f"{path} is corrupt: tensor {tensor.name!r} has a first dimension of "
                f"{tensor.dims[0]}, not a multiple of the {known.name} block size "
                f"{known.block_size}"
            )
        nbytes = tensor.nbytes
        assert nbytes is not None  # the type is known
        end = max(end, data_offset + tensor.offset + nbytes)
    return end
