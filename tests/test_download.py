"""Downloads: resume, verification before use, one-line errors, log-friendly progress.

GitHub releases are unreachable here, so a real HTTP server on 127.0.0.1
(tests/support/release_server.py) serves the bytes; urllib, TCP, Range/206 and the
dropped connections are real.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
from pathlib import Path

import pytest

from edgebundle.download import EXTRA_CA_ENV, fetch, tls_context
from edgebundle.errors import (
    ChecksumMismatchError,
    ChecksumSourceError,
    ConfigError,
    DownloadError,
)
from edgebundle.progress import terminal_progress
from edgebundle.sha256sum import parse_sha256sum, published_sha256
from tests.support.release_server import ReleaseServer, closed_port_url

SIZE = 300_000


@pytest.fixture
def blob(request: pytest.FixtureRequest) -> tuple[str, bytes, str]:
    """A random file on the test's release server (the HTTPS one when it uses that)."""
    which = "https_release_server" if "https_release_server" in request.fixturenames else (
        "release_server")
    server: ReleaseServer = request.getfixturevalue(which)
    data = os.urandom(SIZE)
    server.root.mkdir(parents=True, exist_ok=True)
    (server.root / "blob.bin").write_bytes(data)
    return "blob.bin", data, hashlib.sha256(data).hexdigest()


def test_fetch_verifies_and_reports_progress(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, data, sha = blob
    seen: list[tuple[int, int | None]] = []
    got = fetch(
        release_server.url(name),
        tmp_path / "out" / "b.bin",
        sha256=sha,
        downloads_dir=tmp_path / "dl",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert got.path.read_bytes() == data and got.sha256 == sha and got.size == SIZE
    assert seen[-1] == (SIZE, SIZE)
    assert list((tmp_path / "dl").iterdir()) == []  # the partial file became the result


def test_dropped_connection_resumes_with_range(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, data, sha = blob
    release_server.drop_after(name, 100_000)
    got = fetch(
        release_server.url(name), tmp_path / "b.bin", sha256=sha, downloads_dir=tmp_path / "dl"
    )
    assert got.path.read_bytes() == data
    assert got.resumed_from == 100_000
    gets = release_server.gets(name)
    assert [(r.range, r.status) for r in gets] == [(None, 200), ("bytes=100000-", 206)]


def test_failed_run_keeps_partial_and_next_run_resumes(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, data, sha = blob
    release_server.drop_after(name, 50_000)
    with pytest.raises(DownloadError, match="resume from 50000 bytes"):
        fetch(
            release_server.url(name),
            tmp_path / "b.bin",
            sha256=sha,
            downloads_dir=tmp_path / "dl",
            retries=1,
        )
    assert not (tmp_path / "b.bin").exists()
    (part,) = (tmp_path / "dl").glob("*.part")
    assert part.stat().st_size == 50_000
    got = fetch(
        release_server.url(name), tmp_path / "b.bin", sha256=sha, downloads_dir=tmp_path / "dl"
    )
    assert got.sha256 == sha and got.resumed_from == 50_000
    assert release_server.gets(name)[-1].range == "bytes=50000-"


def partial_run(server: ReleaseServer, name: str, sha: str | None, tmp_path: Path,
                keep: int) -> None:
    """A run that stops after ``keep`` bytes and leaves its partial file."""
    server.drop_after(name, keep)
    with pytest.raises(DownloadError, match=f"resume from {keep} bytes"):
        fetch(server.url(name), tmp_path / "b.bin", sha256=sha, downloads_dir=tmp_path / "dl",
              retries=1)


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
def test_a_file_changed_on_the_server_restarts_from_zero(
    release_server: ReleaseServer, tmp_path: Path, validator: str
) -> None:
    """The resume carries If-Range; the server sends the new file whole, never a splice.

    Unpinned (sha256=None, as `bundle build` fetches an "unknown" pin to record its
    sha256 on first use), so nothing after the download would catch a splice.
    """
    release_server.etag = validator == "etag"
    release_server.last_modified = validator == "last_modified"
    file = release_server.root / "blob.bin"
    file.parent.mkdir(parents=True, exist_ok=True)
    old = os.urandom(SIZE)
    file.write_bytes(old)
    os.utime(file, (1_700_000_000, 1_700_000_000))
    partial_run(release_server, "blob.bin", None, tmp_path, 60_000)
    new = os.urandom(SIZE)  # the server now has another file under the same name
    file.write_bytes(new)
    os.utime(file, (1_700_000_100, 1_700_000_100))

    got = fetch(release_server.url("blob.bin"), tmp_path / "b.bin", sha256=None,
                downloads_dir=tmp_path / "dl")

    assert got.path.read_bytes() == new and got.resumed_from == 0
    assert got.sha256 == hashlib.sha256(new).hexdigest()
    resumed = release_server.gets("blob.bin")[-1]
    assert (resumed.range, resumed.status) == ("bytes=60000-", 200)
    expected = ('"' + hashlib.sha256(old).hexdigest() + '"' if validator == "etag"
                else "Tue, 14 Nov 2023 22:13:20 GMT")
    assert resumed.if_range == expected
    assert list((tmp_path / "dl").iterdir()) == []


def test_an_unchanged_file_resumes_with_if_range(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, data, sha = blob
    partial_run(release_server, name, sha, tmp_path, 40_000)
    got = fetch(release_server.url(name), tmp_path / "b.bin", sha256=sha,
                downloads_dir=tmp_path / "dl")
    assert got.path.read_bytes() == data and got.resumed_from == 40_000
    last = release_server.gets(name)[-1]
    assert (last.range, last.if_range, last.status) == (
        "bytes=40000-", f'"{sha}"', 206)


def test_a_server_ignoring_if_range_with_a_new_etag_restarts(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, data, sha = blob
    partial_run(release_server, name, sha, tmp_path, 40_000)
    (part,) = (tmp_path / "dl").glob("*.validator")
    part.write_text('"an-older-version"\n')  # the partial bytes were of another version
    release_server.ignore_if_range = True
    got = fetch(release_server.url(name), tmp_path / "b.bin", sha256=sha,
                downloads_dir=tmp_path / "dl")
    assert got.path.read_bytes() == data and got.resumed_from == 0
    assert [r.status for r in release_server.gets(name)][-2:] == [206, 200]


def test_without_validators_a_partial_file_is_not_resumed(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, data, sha = blob
    release_server.etag = release_server.last_modified = False
    partial_run(release_server, name, sha, tmp_path, 40_000)
    got = fetch(release_server.url(name), tmp_path / "b.bin", sha256=sha,
                downloads_dir=tmp_path / "dl")
    assert got.path.read_bytes() == data and got.resumed_from == 0
    assert release_server.gets(name)[-1].range is None


def test_server_without_ranges_restarts_cleanly(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, data, sha = blob
    release_server.ignore_ranges = True
    release_server.drop_after(name, 70_000)
    got = fetch(
        release_server.url(name), tmp_path / "b.bin", sha256=sha, downloads_dir=tmp_path / "dl"
    )
    assert got.path.read_bytes() == data and got.resumed_from == 0
    assert [r.status for r in release_server.gets(name)] == [200, 200]


def test_checksum_mismatch_discards_everything(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, _, sha = blob
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as err:
        fetch(
            release_server.url(name),
            tmp_path / "b.bin",
            sha256=wrong,
            downloads_dir=tmp_path / "dl",
        )
    assert f"expected {wrong}" in str(err.value) and f"got {sha}" in str(err.value)
    assert not (tmp_path / "b.bin").exists()
    assert list((tmp_path / "dl").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_unverified_fetch_returns_actual_sha(
    release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, _, sha = blob
    got = fetch(
        release_server.url(name), tmp_path / "b.bin", sha256=None, downloads_dir=tmp_path / "dl"
    )
    assert got.sha256 == sha


def test_refused_connection_is_one_line_and_not_retried(tmp_path: Path) -> None:
    url = closed_port_url("WasmEdge.tar.gz")
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "x", sha256=None, downloads_dir=tmp_path / "dl")
    message = str(err.value)
    assert message.startswith(url) and "unreachable (connection refused)" in message
    assert "\n" not in message


def test_unknown_host_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"no-such-host\.invalid unreachable"):
        fetch(
            "http://no-such-host.invalid/x.tar.gz",
            tmp_path / "x",
            sha256=None,
            downloads_dir=tmp_path / "dl",
        )


def test_http_404_is_one_line(release_server: ReleaseServer, tmp_path: Path) -> None:
    release_server.root.mkdir(parents=True, exist_ok=True)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(
            release_server.url("missing.tar.gz"),
            tmp_path / "x",
            sha256=None,
            downloads_dir=tmp_path / "dl",
        )
    assert len(release_server.gets("missing.tar.gz")) == 1  # a 404 is final: no retries


def test_local_paths_and_file_urls_are_copied_and_verified(tmp_path: Path) -> None:
    source = tmp_path / "bundle" / "a.bin"
    source.parent.mkdir()
    source.write_bytes(b"bundled bytes")
    sha = hashlib.sha256(b"bundled bytes").hexdigest()
    assert fetch(source, tmp_path / "o1", sha256=sha, downloads_dir=tmp_path).sha256 == sha
    got = fetch(source.as_uri(), tmp_path / "o2", sha256=sha, downloads_dir=tmp_path)
    assert got.path.read_bytes() == b"bundled bytes"
    with pytest.raises(ChecksumMismatchError):
        fetch(source, tmp_path / "o3", sha256="f" * 64, downloads_dir=tmp_path)
    assert not (tmp_path / "o3").exists()
    with pytest.raises(DownloadError, match="file not found"):
        fetch(tmp_path / "nope", tmp_path / "o4", sha256=None, downloads_dir=tmp_path)


def test_unsupported_scheme_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported URL scheme 'ftp'"):
        fetch("ftp://example.org/x", tmp_path / "x", sha256=None, downloads_dir=tmp_path)


def test_plain_progress_prints_a_line_per_ten_percent() -> None:
    stream = io.StringIO()  # not a TTY, like a CI log
    with terminal_progress("WasmEdge 0.14.1", stream) as update:
        for done in range(0, 1_000_001, 25_000):
            update(done, 1_000_000)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WasmEdge 0.14.1: 10% of 1.0 MB"
    assert lines[-1] == "WasmEdge 0.14.1: 100% of 1.0 MB"
    assert len(lines) == 10


def test_silent_server_times_out_after_retries(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts TCP connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.tar.gz"
        with pytest.raises(DownloadError, match=r"timed out \(gave up after 2 attempts"):
            fetch(
                url,
                tmp_path / "x",
                sha256=None,
                downloads_dir=tmp_path / "dl",
                timeout=0.2,
                retries=2,
            )


# ---------------------------------------------------------------- the publisher's SHA256SUM


def sums(server: ReleaseServer, text: str) -> str:
    server.root.mkdir(parents=True, exist_ok=True)
    (server.root / "SHA256SUM").write_text(text, encoding="utf-8")
    return server.url("SHA256SUM")


def test_sha256sum_lines_as_sha256sum_writes_them(https_release_server: ReleaseServer) -> None:
    a, b, c, d = "a" * 64, "B" * 64, "c" * 64, "d" * 64
    url = sums(
        https_release_server,
        f"# checksums\n{a}  WasmEdge-1-x.tar.gz\r\n{b} *bin.tar.gz\n{c}  ./dot.tar.gz\n"
        f"\n{d}  WasmEdge-1-x.tar.gz.sig\n",
    )
    assert published_sha256(url, "WasmEdge-1-x.tar.gz") == a  # CRLF, not the .sig line
    assert published_sha256(url, "bin.tar.gz") == "b" * 64  # binary mode, lowercased
    assert published_sha256(url, "dot.tar.gz") == c
    assert parse_sha256sum(f"{a}  n\n{a}  n\nnot a line\n") == {"n": {a}}


def test_sha256sum_must_list_the_file_once(https_release_server: ReleaseServer) -> None:
    url = sums(https_release_server, f"{'a' * 64}  other.tar.gz\n")
    with pytest.raises(
        ChecksumSourceError, match=f"^{url} does not list x.tar.gz, so nothing published"
    ):
        published_sha256(url, "x.tar.gz")
    url = sums(https_release_server, f"{'a' * 64}  x.tar.gz\n{'b' * 64}  x.tar.gz\n")
    with pytest.raises(ChecksumSourceError, match="lists x.tar.gz with 2 different sha256s"):
        published_sha256(url, "x.tar.gz")


def test_a_missing_sha256sum_is_one_line(https_release_server: ReleaseServer) -> None:
    url = https_release_server.url("SHA256SUM")
    with pytest.raises(ChecksumSourceError) as caught:
        published_sha256(url, "x.tar.gz")
    assert str(caught.value) == (
        f"{url}: HTTP 404 Not Found: the release publishes no SHA256SUM to verify x.tar.gz "
        "against; pin a sha256 quoted from a published source in the lock, or install from "
        "a bundle"
    )


def test_sha256sum_over_plain_http_is_never_read(release_server: ReleaseServer) -> None:
    url = sums(release_server, f"{'a' * 64}  x.tar.gz\n")
    with pytest.raises(ChecksumSourceError, match="refusing to read a checksum list over http"):
        published_sha256(url, "x.tar.gz")
    assert release_server.gets() == []


def test_sha256sum_redirects_stay_on_https(
    https_release_server: ReleaseServer, release_server: ReleaseServer
) -> None:
    """GitHub answers release downloads with a redirect: followed, but to https only."""
    sums(https_release_server, f"{'a' * 64}  x.tar.gz\n")
    https_release_server.redirect("moved/SHA256SUM", https_release_server.url("SHA256SUM"))
    assert published_sha256(https_release_server.url("moved/SHA256SUM"), "x.tar.gz") == "a" * 64

    plain = sums(release_server, f"{'b' * 64}  x.tar.gz\n")
    https_release_server.redirect("SHA256SUM", plain)
    with pytest.raises(ChecksumSourceError) as caught:
        published_sha256(https_release_server.url("SHA256SUM"), "x.tar.gz")
    assert f"redirected to {plain}, which is not https" in str(caught.value)
    assert release_server.gets() == []  # the plain http copy was never read


def test_sha256sum_from_an_untrusted_certificate_is_refused(
    https_release_server: ReleaseServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the test CA (the extra CA file only adds trust), TLS verification fails."""
    url = sums(https_release_server, f"{'a' * 64}  x.tar.gz\n")
    monkeypatch.delenv(EXTRA_CA_ENV)
    with pytest.raises(DownloadError, match="TLS certificate of 127.0.0.1 not trusted"):
        published_sha256(url, "x.tar.gz")


def test_a_broken_extra_ca_file_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(EXTRA_CA_ENV, str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=f"{EXTRA_CA_ENV}=.*nope.pem: cannot load CA"):
        tls_context()


def test_a_mismatch_names_the_sha256sum_it_contradicts(
    https_release_server: ReleaseServer, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    name, _, _ = blob
    listed = "e" * 64
    with pytest.raises(ChecksumMismatchError) as caught:
        fetch(https_release_server.url(name), tmp_path / "b.bin", sha256=listed,
              downloads_dir=tmp_path / "dl", expected_from="https://x/SHA256SUM")
    assert f"sha256 mismatch: https://x/SHA256SUM lists {listed}, got" in str(caught.value)
    assert not (tmp_path / "b.bin").exists()
