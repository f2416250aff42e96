"""Unpacking a downloaded archive (.tar.gz/.xz/.bz2 or .zip) without letting it escape.

Every entry is checked before anything is written: an absolute path, a ``..`` part, a
link pointing outside the target or a special file refuses the whole archive.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from edgebundle.errors import InstallError


def extract_archive(archive: Path, into: Path) -> None:
    """Unpack a .tar(.gz|.xz|.bz2) or .zip, refusing anything that would land outside."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    _check_member(archive, member)
                tar.extractall(into, filter="data")
        else:
            raise InstallError(f"{archive.name}: not a tar or zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise InstallError(f"{archive.name}: unsafe or damaged archive ({exc})") from None


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise InstallError(
            f"{archive.name}: refusing archive entry {member.name!r} (outside the target)"
        )
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = name.parent if member.issym() else PurePosixPath()
        if target.is_absolute() or _escapes(base / target):
            raise InstallError(
                f"{archive.name}: refusing link {member.name!r} -> {member.linkname!r} "
                "(points outside the target)"
            )
    elif not (member.isfile() or member.isdir()):
        raise InstallError(f"{archive.name}: refusing special file {member.name!r}")


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in (".", ""):
            depth += 1
    return False


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                raise InstallError(f"{archive.name}: refusing archive entry {info.filename!r}")
        for info in zf.infolist():
            path = Path(zf.extract(info, into))
            mode = (info.external_attr >> 16) & 0o755
            if mode and not info.is_dir():
                path.chmod(mode | stat.S_IRUSR)

