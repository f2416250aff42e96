"""Downloads that resume, show progress, and are sha256-verified before anything uses them.

``fetch`` takes an http(s) URL, a ``file://`` URL or a plain path (an offline bundle)
and leaves a verified file at ``dest``:

- http(s): bytes go to ``<downloads_dir>/<name>.part``. A dropped connection is
  retried with ``Range: bytes=N-`` and the server's 206 answer is appended; a 200
  answer means the server ignores ranges, so the partial file starts over. A failed
  fetch keeps the partial file, so running the command again resumes it too.
  A resume always carries ``If-Range`` with the validator of the response the
  partial bytes came from (its strong ETag, else its Last-Modified; kept beside the
  partial file as ``<name>.part.validator``): a file that changed on the server since
  is sent whole (200) and the download restarts from zero, never a splice of two
  files. A partial file without a validator (the server gave none) is not resumed.
- files are copied (a bundle is already local; nothing to resume).
- the sha256 is checked *before* the file reaches ``dest`` (a temp file in dest's
  directory, then ``os.replace``): a mismatching download is deleted and never seen.

``sha256=None`` means the caller decided to accept an unverified file (the pin layer
refuses that unless ``--allow-unverified``); the actual sha256 is always returned so
it can be reported or recorded.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import secrets
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

from edgebundle import __version__
from edgebundle.errors import ChecksumMismatchError, ConfigError, DownloadError

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None when the server does not say)."""

ProgressFactory = Callable[[str], AbstractContextManager[Progress]]
"""Makes the progress callback for one labelled download; leaving the context ends it."""

Log = Callable[[str], None]
"""Where installers and bundle builders say what they do, one line at a time."""

CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes\s+(?P<start>\d+)-\d+/(?P<total>\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(?P<total>\d+)")


@dataclass(frozen=True)
class Fetched:
    """A verified file at ``path``; ``sha256`` is what its bytes hash to."""

    path: Path
    sha256: str
    size: int
    resumed_from: int = 0  # bytes a previous attempt or run had already fetched


class _Retry(Exception):
    """A transient failure: try again, resuming from what the partial file holds."""


def fetch(
    source: str | Path,
    dest: Path,
    *,
    sha256: str | None,
    downloads_dir: Path,
    progress: Progress | None = None,
    timeout: float = 30,
    retries: int = 3,
) -> Fetched:
    """Download or copy ``source`` to ``dest``, verified against ``sha256`` first."""
    text = str(source)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if scheme in ("http", "https"):
        downloads_dir.mkdir(parents=True, exist_ok=True)
        part = downloads_dir / _part_name(text, sha256)
        resumed_from = _download(text, part, progress, timeout, max(1, retries))
        return _verify_and_place(text, part, dest, sha256, resumed_from)
    if scheme == "file":
        path = Path(unquote(urlsplit(text).path))
    elif scheme:
        raise ConfigError(
            f"{text}: unsupported URL scheme {scheme!r}; use http(s)://, file:// or a path"
        )
    else:
        path = Path(text)
    return _copy(path, dest, sha256, progress)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _part_name(url: str, sha256: str | None) -> str:
    filename = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or "download"
    key = sha256 or hashlib.sha256(url.encode()).hexdigest()
    return f"{filename}.{key[:16]}.part"


def _download(url: str, part: Path, progress: Progress | None, timeout: float, retries: int) -> int:
    """Fill ``part`` with the whole resource; returns the offset the last attempt resumed at."""
    for attempt in range(1, retries + 1):
        try:
            return _attempt(url, part, progress, timeout)
        except _Retry as exc:
            if attempt == retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{url}: {exc} (gave up after {retries} attempts; run the command again "
                    f"to resume from {have} bytes)"
                ) from None
            time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))  # brief backoff; the server may recover
    raise AssertionError("unreachable")  # pragma: no cover


def _attempt(url: str, part: Path, progress: Progress | None, timeout: float) -> int:
    """One request; returns the offset it appended at (0 when it wrote from the start)."""
    have = part.stat().st_size if part.exists() else 0
    validator = _load_validator(part) if have else None
    if have and validator is None:  # nothing proves the bytes are of today's file
        _discard(part)
        have = 0
    headers = {"User-Agent": f"edgebundle/{__version__}"}
    if have and validator is not None:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            match = _UNSATISFIED_RANGE.search(exc.headers.get("Content-Range", "") or "")
            if match and int(match["total"]) == have:
                return have  # an earlier run got every byte but stopped before verifying
            _discard(part)
            raise _Retry("the server rejected the resume range; starting over") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _connect_error(url, exc.reason, timeout) from None
    except (TimeoutError, http.client.HTTPException, OSError) as exc:
        raise _Retry(_describe(exc)) from None
    with response:
        total: int | None
        if response.status == 206:
            match = _CONTENT_RANGE.search(response.headers.get("Content-Range", "") or "")
            if match is None or int(match["start"]) != have:
                _discard(part)
                raise _Retry("the server answered a different range; starting over")
            if validator is not None and _changed(validator, response.headers):
                _discard(part)  # a server that ignored If-Range: these bytes are of another file
                raise _Retry("the file changed on the server; starting over")
            mode = "ab"
            total = None if match["total"] == "*" else int(match["total"])
        else:
            mode, have = "wb", 0  # no range support, or the file changed: start over
            _save_validator(part, response.headers)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        done = have
        if progress is not None:
            progress(done, total)
        try:
            with part.open(mode) as fh:
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except (TimeoutError, http.client.HTTPException, OSError) as exc:
            raise _Retry(f"connection lost after {done} bytes ({_describe(exc)})") from None
        if total is not None and done < total:
            raise _Retry(f"connection closed after {done} of {total} bytes")
    return have


def _validator_file(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _validator_of(headers: Message) -> str | None:
    """What ``If-Range`` may carry for this response: a strong ETag, else Last-Modified."""
    etag = (headers.get("ETag") or "").strip()
    if etag.startswith('"'):  # weak ETags (W/"…") are not allowed in If-Range
        return etag
    modified = (headers.get("Last-Modified") or "").strip()
    return modified or None


def _changed(validator: str, headers: Message) -> bool:
    """True when a 206 answer names another version than the one ``validator`` is of."""
    field = "ETag" if validator.startswith('"') else "Last-Modified"
    now = (headers.get(field) or "").strip()
    return bool(now) and now != validator


def _save_validator(part: Path, headers: Message) -> None:
    """Record the validator of the response whose bytes ``part`` is about to get."""
    validator = _validator_of(headers)
    if validator is None:
        _validator_file(part).unlink(missing_ok=True)
    else:
        _validator_file(part).write_text(validator + "\n", encoding="utf-8")


def _load_validator(part: Path) -> str | None:
    try:
        text = _validator_file(part).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and "\n" not in text and "\r" not in text else None


def _discard(part: Path) -> None:
    """Drop a partial download and what it was resumed by."""
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


def _connect_error(url: str, reason: object, timeout: float) -> Exception:
    """Host-level failures are final (retrying a DNS miss or a firewall helps nobody)."""
    host = urlsplit(url).hostname or url
    if isinstance(reason, TimeoutError | socket.timeout):
        return DownloadError(f"{url}: {host} unreachable (no answer within {timeout:g} s)")
    if isinstance(reason, socket.gaierror):
        return DownloadError(f"{url}: {host} unreachable (cannot resolve host: {reason.strerror})")
    if isinstance(reason, ConnectionRefusedError):
        return DownloadError(f"{url}: {host} unreachable (connection refused)")
    if isinstance(reason, OSError) and reason.errno in (101, 113):  # ENETUNREACH, EHOSTUNREACH
        return DownloadError(f"{url}: {host} unreachable ({reason.strerror})")
    if isinstance(reason, BaseException):
        return _Retry(_describe(reason))
    return _Retry(str(reason))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _verify_and_place(
    url: str, part: Path, dest: Path, sha256: str | None, resumed_from: int
) -> Fetched:
    actual = sha256_file(part)
    _validator_file(part).unlink(missing_ok=True)
    if sha256 is not None and actual != sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"{url}: sha256 mismatch: expected {sha256}, got {actual}; the download was "
            "discarded (check the pin, or the mirror serving this URL)"
        )
    size = part.stat().st_size
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    try:
        try:
            os.replace(part, tmp)
        except OSError:  # another file system: copy, then drop the partial file
            shutil.copyfile(part, tmp)
            part.unlink()
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Fetched(path=dest, sha256=actual, size=size, resumed_from=resumed_from)


def _copy(source: Path, dest: Path, sha256: str | None, progress: Progress | None) -> Fetched:
    try:
        total = source.stat().st_size
        reader = source.open("rb")
    except FileNotFoundError:
        raise DownloadError(f"{source}: file not found") from None
    except OSError as exc:
        raise DownloadError(f"{source}: cannot read ({exc.strerror})") from None
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    digest = hashlib.sha256()
    try:
        with reader, tmp.open("wb") as writer:
            done = 0
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise ChecksumMismatchError(
                f"{source}: sha256 mismatch: expected {sha256}, got {actual}; the file was "
                "not used (the bundle is damaged or was altered: rebuild it)"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Fetched(path=dest, sha256=actual, size=done)


# ---------------------------------------------------------------- progress rendering


def progress_for(
    factory: ProgressFactory | None, label: str
) -> AbstractContextManager[Progress | None]:
    """The factory's progress context for ``label``, or one yielding None (no progress)."""
    if factory is None:
        return nullcontext(None)
    return factory(label)


@contextmanager
def terminal_progress(label: str, stream: TextIO | None = None) -> Iterator[Progress]:
    """A rich progress bar on a terminal; elsewhere (CI logs) a plain line every ~10 %."""
    out = stream if stream is not None else sys.stderr
    if out.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with RichProgress(*columns, console=Console(file=out)) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return
    yield _PlainProgress(label, out)


class _PlainProgress:
    """Log-friendly progress: one line per 10 % (or per 10 MB when the size is unknown)."""

    def __init__(self, label: str, out: TextIO) -> None:
        self.label, self.out, self.last_step = label, out, -1

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            step = min(10, done * 10 // total)
            text = f"{step * 10}% of {_size(total)}"
        else:
            step = done // (10 * 1024 * 1024)
            text = _size(done)
        if step > self.last_step and (step > 0 or done == total):
            self.last_step = step
            print(f"{self.label}: {text}", file=self.out, flush=True)


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"
