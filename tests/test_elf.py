"""ELF header parsing: machine and word size, on fabricated headers and a real binary."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from edgebundle.elf import parse_elf_header, read_elf_header
from edgebundle.host import normalize_arch
from tests.support.standin_wasmedge import fake_plugin


def test_x86_64_and_aarch64_headers(tmp_path: Path) -> None:
    x86 = read_elf_header(fake_plugin(tmp_path / "x86.so", machine=0x3E))
    arm = read_elf_header(fake_plugin(tmp_path / "arm.so", machine=0xB7))
    assert x86 is not None and x86.arch == "x86_64" and x86.bits == 64 and x86.little_endian
    assert arm is not None and arm.arch == "aarch64"
    assert x86.matches_host("x86_64") is True
    assert arm.matches_host("x86_64") is False
    assert arm.matches_host("aarch64") is True


def test_the_running_python_matches_this_host() -> None:
    """A real ELF file: the interpreter running this test was built for this machine."""
    header = read_elf_header(Path(sys.executable).resolve())
    assert header is not None
    host_arch = normalize_arch(platform.machine(), platform.system().lower())
    assert header.matches_host(host_arch) is True


def test_big_endian_32_bit_header() -> None:
    raw = bytearray(20)
    raw[0:4] = b"\x7fELF"
    raw[4], raw[5] = 1, 2  # 32-bit, big endian
    raw[18:20] = (0x08).to_bytes(2, "big")  # MIPS
    header = parse_elf_header(bytes(raw))
    assert header is not None and header.bits == 32 and not header.little_endian
    assert header.machine == 0x08 and header.arch is None
    assert header.describe() == "e_machine 0x8 (32-bit)"
    assert header.matches_host("x86_64") is False
    assert header.matches_host("loongarch64") is None  # not in the table: cannot tell


def test_not_elf(tmp_path: Path) -> None:
    macho = tmp_path / "lib.dylib"
    macho.write_bytes(bytes.fromhex("cffaedfe0c000001") + bytes(56))
    assert read_elf_header(macho) is None
    assert parse_elf_header(b"\x7fELF") is None  # too short
    assert parse_elf_header(b"\x7fELF" + bytes([9, 1]) + bytes(14)) is None  # bad class
