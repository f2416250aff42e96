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

A release's own ``SHA256SUM`` (for pins that quote no published value) is read by
:mod:`edgebundle.sha256sum`; progress bars are :mod:`edgebundle.progress`'s.

TLS: the system's trusted CAs, plus the certificates of ``$EDGEBUNDLE_EXTRA_CA_FILE``
when it is set (a site's TLS-intercepting proxy; the test suite's throwaway CA). It
only ever adds trust: certificate and host name checks are never turned off.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import re
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edgebundle import __version__, files
from edgebundle.errors import (
    ChecksumMismatchError,
    ConfigError,
    DownloadError,
)
from edgebundle.progress import Progress

CHUNK = 256 * 1024
EXTRA_CA_ENV = "EDGEBUNDLE_EXTRA_CA_FILE"
_CONTENT_RANGE = re.compile(r"bytes\s+(?P<start>\d+)-\d+/(?P<total>\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(?P<total>\d+)")


@dataclass(frozen=True)
class Fetched:
    """A verified file at ``path``; ``sha256`` is what its bytes hash to."""

    path: Path
    sha256: str
    size: int
    resumed_from: int = 0  # bytes a previous attempt or run had already fetched


class Transient(Exception):
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
    expected_from: str | None = None,
) -> Fetched:
    """Download or copy ``source`` to ``dest``, verified against ``sha256`` first.

    ``expected_from`` names where ``sha256`` came from when it is not a pin (e.g. a
    release's SHA256SUM URL), so a mismatch says which source the file contradicts.
    """
    text = str(source)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if scheme in ("http", "https"):
        downloads_dir.mkdir(parents=True, exist_ok=True)
        part = downloads_dir / _part_name(text, sha256)
        resumed_from = _download(text, part, progress, timeout, max(1, retries))
        return _verify_and_place(text, part, dest, sha256, resumed_from, expected_from)
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
        except Transient as exc:
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
        response = urllib.request.urlopen(  # noqa: S310 (scheme checked)
            request, timeout=timeout, context=tls_context()
        )
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            match = _UNSATISFIED_RANGE.search(exc.headers.get("Content-Range", "") or "")
            if match and int(match["total"]) == have:
                return have  # an earlier run got every byte but stopped before verifying
            _discard(part)
            raise Transient("the server rejected the resume range; starting over") from None
        if exc.code >= 500 or exc.code == 429:
            raise Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise connect_error(url, exc.reason, timeout) from None
    except (TimeoutError, http.client.HTTPException, OSError) as exc:
        raise Transient(describe_error(exc)) from None
    with response:
        total: int | None
        if response.status == 206:
            match = _CONTENT_RANGE.search(response.headers.get("Content-Range", "") or "")
            if match is None or int(match["start"]) != have:
                _discard(part)
                raise Transient("the server answered a different range; starting over")
            if validator is not None and _changed(validator, response.headers):
                _discard(part)  # a server that ignored If-Range: these bytes are of another file
                raise Transient("the file changed on the server; starting over")
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
            raise Transient(f"connection lost after {done} bytes ({describe_error(exc)})") from None
        if total is not None and done < total:
            raise Transient(f"connection closed after {done} of {total} bytes")
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


def connect_error(url: str, reason: object, timeout: float) -> Exception:
    """Host-level failures are final (retrying a DNS miss or a firewall helps nobody)."""
    host = urlsplit(url).hostname or url
    if isinstance(reason, ssl.SSLCertVerificationError):  # the same certificate next time
        return DownloadError(
            f"{url}: TLS certificate of {host} not trusted ({reason.verify_message}); "
            f"check the system's CA certificates (or {EXTRA_CA_ENV} behind a TLS proxy)"
        )
    if isinstance(reason, TimeoutError | socket.timeout):
        return DownloadError(f"{url}: {host} unreachable (no answer within {timeout:g} s)")
    if isinstance(reason, socket.gaierror):
        return DownloadError(f"{url}: {host} unreachable (cannot resolve host: {reason.strerror})")
    if isinstance(reason, ConnectionRefusedError):
        return DownloadError(f"{url}: {host} unreachable (connection refused)")
    if isinstance(reason, OSError) and reason.errno in (101, 113):  # ENETUNREACH, EHOSTUNREACH
        return DownloadError(f"{url}: {host} unreachable ({reason.strerror})")
    if isinstance(reason, BaseException):
        return Transient(describe_error(reason))
    return Transient(str(reason))


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _verify_and_place(
    url: str,
    part: Path,
    dest: Path,
    sha256: str | None,
    resumed_from: int,
    expected_from: str | None = None,
) -> Fetched:
    actual = sha256_file(part)
    _validator_file(part).unlink(missing_ok=True)
    if sha256 is not None and actual != sha256:
        part.unlink(missing_ok=True)
        if expected_from is not None:
            raise ChecksumMismatchError(
                f"{url}: sha256 mismatch: {expected_from} lists {sha256}, got {actual}; the "
                "download was discarded (the file or the checksum list was altered: do not "
                "install it; report it to the publisher)"
            )
        raise ChecksumMismatchError(
            f"{url}: sha256 mismatch: expected {sha256}, got {actual}; the download was "
            "discarded (check the pin, or the mirror serving this URL)"
        )
    size = part.stat().st_size
    with files.replacing(dest) as tmp:
        try:
            os.replace(part, tmp)
        except OSError:  # another file system: copy, then drop the partial file
            shutil.copyfile(part, tmp)
            part.unlink()
    return Fetched(path=dest, sha256=actual, size=size, resumed_from=resumed_from)


def _copy(source: Path, dest: Path, sha256: str | None, progress: Progress | None) -> Fetched:
    try:
        total = source.stat().st_size
        reader = source.open("rb")
    except FileNotFoundError:
        raise DownloadError(f"{source}: file not found") from None
    except OSError as exc:
        raise DownloadError(f"{source}: cannot read ({exc.strerror})") from None
    digest = hashlib.sha256()
    done = 0
    with reader, files.replacing(dest) as tmp:  # a mismatch below: dest is left as it was
        with tmp.open("wb") as writer:
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
    return Fetched(path=dest, sha256=actual, size=done)


# ---------------------------------------------------------------- TLS


def tls_context() -> ssl.SSLContext:
    """The system's CAs plus ``$EDGEBUNDLE_EXTRA_CA_FILE``'s; verification always on."""
    return _tls_context(os.environ.get(EXTRA_CA_ENV) or None)


@functools.lru_cache(maxsize=4)
def _tls_context(extra_ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()  # CERT_REQUIRED, check_hostname
    if extra_ca_file is not None:
        try:
            context.load_verify_locations(cafile=extra_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{EXTRA_CA_ENV}={extra_ca_file}: cannot load CA certificates from it "
                f"({describe_error(exc)}); fix the file or unset {EXTRA_CA_ENV}"
            ) from None
    return context
