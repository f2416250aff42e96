"""Which CPU a shared library was built for, from the first 20 bytes of its ELF header.

Doctor reads a plugin's header instead of loading it: loading a library for another
architecture fails with a vague ``cannot open shared object file`` (or WasmEdge skips
it silently), while the header names the machine exactly.

ELF header bytes used (System V gABI): 0-3 magic ``\\x7fELF``; 4 class (1 = 32-bit,
2 = 64-bit); 5 data encoding (1 = little, 2 = big endian); 18-19 ``e_machine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
_HEADER_BYTES = 20

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
    machine = int.from_bytes(data[18:20], "little" if order == "little" else "big")
    return ElfHeader(bits=bits, little_endian=order == "little", machine=machine)


def read_elf_header(path: Path) -> ElfHeader | None:
    """Read ``path``'s ELF header; None when it is not ELF (e.g. a macOS Mach-O dylib).

    Raises OSError when the file cannot be read.
    """
    with path.open("rb") as fh:
        return parse_elf_header(fh.read(_HEADER_BYTES))
