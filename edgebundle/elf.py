"""What an ELF file says about itself without loading it: its CPU, its type, and the
libraries (and library search paths) it asks the dynamic loader for.

Doctor reads a plugin's header instead of loading it: loading a library for another
architecture fails with a vague ``cannot open shared object file`` (or WasmEdge skips
it silently), while the header names the machine exactly. And it reads the ``wasmedge``
binary's dynamic section to tell which ``libwasmedge`` the loader will pick, because
WasmEdge finds its default plugin directory relative to that library.

ELF header bytes used (System V gABI): 0-3 magic ``\\x7fELF``; 4 class (1 = 32-bit,
2 = 64-bit); 5 data encoding (1 = little, 2 = big endian); 16-17 ``e_type``; 18-19
``e_machine``; then the program header table (``e_phoff``, ``e_phentsize``,
``e_phnum``), whose ``PT_DYNAMIC`` entry holds ``DT_NEEDED`` / ``DT_RPATH`` /
``DT_RUNPATH`` as offsets into the ``DT_STRTAB`` string table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

ELF_MAGIC = b"\x7fELF"
_HEADER_BYTES = 20
ET_DYN = 3  # e_type of a shared object (and of a PIE executable): what dlopen accepts

# e_machine values (gABI / glibc elf.h) for the architectures devices run, with the
# arch name as edgebundle.host.normalize_arch spells the host.
_MACHINES: dict[tuple[int, int], str] = {
    (0x3E, 64): "x86_64",
    (0x03, 32): "i686",
    (0xB7, 64): "aarch64",
    (0x28, 32): "armv7l",
    (0xF3, 64): "riscv64",
    (0x15, 64): "ppc64le",
    (0x16, 64): "s390x",
}
# Host arch spellings that name the same machine as a _MACHINES value.
_HOST_ALIASES = {"i386": "i686", "i586": "i686", "x86": "i686", "armv6l": "armv7l", "arm": "armv7l"}


@dataclass(frozen=True)
class ElfHeader:
    bits: int  # 32 or 64
    little_endian: bool
    machine: int  # e_machine
    file_type: int = ET_DYN  # e_type

    @property
    def arch(self) -> str | None:
        """The arch name (``x86_64``, ``aarch64``, ...), None for a machine not in the table."""
        return _MACHINES.get((self.machine, self.bits))

    def describe(self) -> str:
        return self.arch or f"e_machine 0x{self.machine:X} ({self.bits}-bit)"

    def matches_host(self, host_arch: str) -> bool | None:
        """True/False when the host arch is known to the table, None when it cannot be told."""
        wanted = _HOST_ALIASES.get(host_arch, host_arch)
        if wanted not in _MACHINES.values():
            return None
        return self.arch == wanted


def parse_elf_header(data: bytes) -> ElfHeader | None:
    """The header fields, or None when ``data`` does not start like an ELF file."""
    if len(data) < _HEADER_BYTES or data[:4] != ELF_MAGIC:
        return None
    bits = {1: 32, 2: 64}.get(data[4])
    order = {1: "little", 2: "big"}.get(data[5])
    if bits is None or order is None:
        return None
    byteorder: Literal["little", "big"] = "little" if order == "little" else "big"
    return ElfHeader(
        bits=bits,
        little_endian=order == "little",
        machine=int.from_bytes(data[18:20], byteorder),
        file_type=int.from_bytes(data[16:18], byteorder),
    )


def read_elf_header(path: Path) -> ElfHeader | None:
    """Read ``path``'s ELF header; None when it is not ELF (e.g. a macOS Mach-O dylib).

    Raises OSError when the file cannot be read.
    """
    with path.open("rb") as fh:
        return parse_elf_header(fh.read(_HEADER_BYTES))


# Program header and dynamic entry types (gABI).
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 15, 29
_MAX_DYNAMIC = 1 << 20  # bytes; a real dynamic section is a few hundred


@dataclass(frozen=True)
class DynamicInfo:
    """What an ELF file asks of the dynamic loader (empty tuples: it asks nothing)."""

    header: ElfHeader
    needed: tuple[str, ...]
    rpath: tuple[str, ...]  # DT_RPATH, colon-split, tokens such as $ORIGIN unexpanded
    runpath: tuple[str, ...]  # DT_RUNPATH, likewise


def read_dynamic(path: Path) -> DynamicInfo | None:
    """``path``'s DT_NEEDED, DT_RPATH and DT_RUNPATH; None when it is not ELF.

    A statically linked file (no PT_DYNAMIC) gives empty tuples. Read through the
    program headers, as the loader does, so a file without section headers works too.
    Raises OSError when the file cannot be read, ValueError when it is truncated.
    """
    with path.open("rb") as fh:
        header = parse_elf_header(fh.read(_HEADER_BYTES))
        if header is None:
            return None
        return _read_dynamic(fh, header)


def _read_dynamic(fh: BinaryIO, header: ElfHeader) -> DynamicInfo:
    order: Literal["little", "big"] = "little" if header.little_endian else "big"
    wide = header.bits == 64

    def number(data: bytes, at: int, size: int) -> int:
        if at + size > len(data):
            raise ValueError("truncated ELF file")
        return int.from_bytes(data[at : at + size], order)

    def read(offset: int, size: int) -> bytes:
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise ValueError("truncated ELF file")
        return data

    ident = read(0, 64 if wide else 52)
    phoff = number(ident, 0x20, 8) if wide else number(ident, 0x1C, 4)
    phentsize = number(ident, 0x36 if wide else 0x2A, 2)
    phnum = number(ident, 0x38 if wide else 0x2C, 2)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None  # (offset, filesz)
    table = read(phoff, phentsize * phnum) if phnum else b""
    for i in range(phnum):
        base = i * phentsize
        p_type = number(table, base, 4)
        if wide:
            offset, vaddr, filesz = (number(table, base + at, 8) for at in (8, 16, 32))
        else:
            offset, vaddr, filesz = (number(table, base + at, 4) for at in (4, 8, 16))
        if p_type == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return DynamicInfo(header, (), (), ())
    entry = 16 if wide else 8
    data = read(dynamic[0], min(dynamic[1], _MAX_DYNAMIC))
    entries: list[tuple[int, int]] = []
    for at in range(0, len(data) - entry + 1, entry):
        tag, value = number(data, at, entry // 2), number(data, at + entry // 2, entry // 2)
        if tag == _DT_NULL:
            break
        entries.append((tag, value))
    values = dict(entries)
    strtab_vaddr, strsz = values.get(_DT_STRTAB), values.get(_DT_STRSZ)
    if strtab_vaddr is None or strsz is None:
        return DynamicInfo(header, (), (), ())
    # DT_STRTAB is an address: the PT_LOAD segment holding it says where it is in the file.
    strtab_offset = next(
        (offset + strtab_vaddr - vaddr for vaddr, offset, filesz in loads
         if vaddr <= strtab_vaddr < vaddr + filesz),
        None,
    )  # fmt: skip
    if strtab_offset is None:
        raise ValueError("DT_STRTAB lies outside every PT_LOAD segment")
    strings = read(strtab_offset, min(strsz, _MAX_DYNAMIC))

    def text(offset: int) -> str:
        end = strings.find(b"\0", offset)
        return strings[offset : end if end >= 0 else len(strings)].decode("utf-8", "replace")

    def paths(tag: int) -> tuple[str, ...]:
        return tuple(p for t, v in entries if t == tag for p in text(v).split(":") if p)

    needed = tuple(text(v) for t, v in entries if t == _DT_NEEDED)
    return DynamicInfo(header, needed, paths(_DT_RPATH), paths(_DT_RUNPATH))
