"""Real (tiny, not runnable) ELF files with a dynamic section, and an ld.so.cache file.

What the dynamic loader reads of a ``wasmedge`` binary is its DT_NEEDED, DT_RPATH and
DT_RUNPATH; these files carry exactly those, laid out as the gABI says (a PT_LOAD
segment mapped at another address than its file offset, so DT_STRTAB must be
translated as the loader does). Nothing here is executed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

X86_64 = 0x3E
_EHDR, _PHDR, _DYN = 64, 56, 16
_BASE = 0x10000  # the PT_LOAD's virtual address of file offset 0


def write_elf(
    path: Path,
    *,
    needed: Sequence[str] = (),
    rpath: str | None = None,
    runpath: str | None = None,
    machine: int = X86_64,
    e_type: int = 3,
) -> Path:
    """A 64-bit little-endian ELF file asking ld.so for ``needed`` along these paths."""
    strings = bytearray(b"\0")

    def add(text: str) -> int:
        offset = len(strings)
        strings.extend(text.encode() + b"\0")
        return offset

    tags = [(1, add(name)) for name in needed]  # DT_NEEDED
    if rpath is not None:
        tags.append((15, add(rpath)))
    if runpath is not None:
        tags.append((29, add(runpath)))
    strtab = _EHDR + 2 * _PHDR
    dynamic = strtab + len(strings)
    tags += [(5, _BASE + strtab), (10, len(strings)), (0, 0)]  # DT_STRTAB, DT_STRSZ, DT_NULL
    size = dynamic + _DYN * len(tags)
    header = bytearray(_EHDR)
    header[0:4] = b"\x7fELF"
    header[4:7] = bytes([2, 1, 1])  # 64-bit, little endian, version 1
    struct.pack_into("<HHI", header, 16, e_type, machine, 1)
    struct.pack_into("<Q", header, 0x20, _EHDR)  # e_phoff
    struct.pack_into("<HHH", header, 0x34, _EHDR, _PHDR, 2)  # e_ehsize, e_phentsize, e_phnum
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD
    phdrs += struct.pack("<IIQQQQQQ", 2, 6, dynamic, _BASE + dynamic, _BASE + dynamic,
                         _DYN * len(tags), _DYN * len(tags), 8)  # PT_DYNAMIC  # fmt: skip
    body = b"".join(struct.pack("<qQ", tag, value) for tag, value in tags)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(header) + phdrs + bytes(strings) + body)
    return path


def write_ld_so_cache(path: Path, entries: Sequence[tuple[str, str]]) -> Path:
    """A glibc ``ld.so.cache`` (new format 1.1) mapping each name to a path."""
    strings = bytearray()
    offsets: list[tuple[int, int]] = []
    table = 48 + 24 * len(entries)
    for name, target in entries:
        key = table + len(strings)
        strings.extend(name.encode() + b"\0")
        value = table + len(strings)
        strings.extend(target.encode() + b"\0")
        offsets.append((key, value))
    header = b"glibc-ld.so.cache1.1" + struct.pack("<IIB3xI12x", len(entries), len(strings), 2, 0)
    body = b"".join(struct.pack("<iIIIQ", 0x0303, k, v, 0, 0) for k, v in offsets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body + bytes(strings))
    return path
