"""A release's own checksum list (``SHA256SUM``): read over https, parsed, one value picked.

For pins that quote no published value (``verify = "release-sha256sum"``): the list is
the only thing vouching for the download, so it is read over https only (redirects
included), must be small text, and must name the file exactly once.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.request
from typing import IO
from urllib.parse import urlsplit

from edgebundle import __version__
from edgebundle.download import Transient, connect_error, describe_error, tls_context
from edgebundle.errors import ChecksumSourceError, DownloadError

SUMS_MAX_BYTES = 1024 * 1024  # WasmEdge's SHA256SUM is a few kB; more is not one


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects (GitHub sends release files from another host) to https only."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme.lower() != "https":
            fp.close()
            raise ChecksumSourceError(
                f"{req.full_url}: redirected to {newurl}, which is not https; a checksum "
                "list vouches for a file only over TLS: refusing it (check the release URL)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_SUM_LINE = re.compile(r"^(?P<sha256>[0-9a-fA-F]{64}) [ *](?P<name>\S.*)$")


def parse_sha256sum(text: str) -> dict[str, set[str]]:
    """``sha256sum`` output (``<hex>  <name>``, ``*`` before a name in binary mode) as
    {name: {sha256, ...}}; other lines (comments, blank) are skipped."""
    listed: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = _SUM_LINE.match(line.rstrip())
        if match is None:
            continue
        name = str(match["name"])
        name = name[2:] if name.startswith("./") else name  # `sha256sum ./*` spells it so
        listed.setdefault(name, set()).add(str(match["sha256"]).lower())
    return listed


def published_sha256(
    sums_url: str, filename: str, *, timeout: float = 30, retries: int = 3
) -> str:
    """The sha256 the checksum list at ``sums_url`` (https only) gives for ``filename``.

    Every way it can fail is a one-line error with a fix; nothing is guessed: a missing
    list, one that does not name the file, or names it twice with two values.
    """
    scheme = urlsplit(sums_url).scheme.lower()
    if scheme != "https":
        raise ChecksumSourceError(
            f"{sums_url}: refusing to read a checksum list over {scheme or 'no scheme'}: it "
            f"vouches for {filename} only when it comes over https; put the https:// release "
            "URL in the lock"
        )
    text = _read_sums(sums_url, filename, timeout, max(1, retries))
    values = parse_sha256sum(text).get(filename, set())
    if not values:
        raise ChecksumSourceError(
            f"{sums_url} does not list {filename}, so nothing published vouches for it; pin "
            "a sha256 quoted from a published source in the lock, or install from a bundle"
        )
    if len(values) > 1:
        raise ChecksumSourceError(
            f"{sums_url} lists {filename} with {len(values)} different sha256s; refusing to "
            "pick one (report it to the publisher; pin a published sha256 in the lock)"
        )
    return next(iter(values))


def _read_sums(url: str, filename: str, timeout: float, retries: int) -> str:
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=tls_context()), _HttpsOnlyRedirects()
    )
    request = urllib.request.Request(url, headers={"User-Agent": f"edgebundle/{__version__}"})
    for attempt in range(1, retries + 1):
        try:
            with opener.open(request, timeout=timeout) as response:
                data: bytes = response.read(SUMS_MAX_BYTES + 1)
            break
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise ChecksumSourceError(
                    f"{url}: HTTP {exc.code} {exc.reason}: the release publishes no SHA256SUM "
                    f"to verify {filename} against; pin a sha256 quoted from a published "
                    "source in the lock, or install from a bundle"
                ) from None
            if exc.code < 500 and exc.code != 429:
                raise ChecksumSourceError(
                    f"{url}: HTTP {exc.code} {exc.reason}; cannot read the checksum list to "
                    f"verify {filename} (try again later, or install from a bundle)"
                ) from None
            failure: Exception = Transient(f"HTTP {exc.code} {exc.reason}")
        except urllib.error.URLError as exc:
            failure = connect_error(url, exc.reason, timeout)
            if not isinstance(failure, Transient):
                raise failure from None
        except (TimeoutError, http.client.HTTPException, OSError) as exc:
            failure = Transient(describe_error(exc))
        if attempt == retries:
            raise DownloadError(
                f"{url}: {failure} (gave up after {retries} attempts); cannot verify "
                f"{filename} without it: try again later, or install from a bundle"
            ) from None
        time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
    if len(data) > SUMS_MAX_BYTES:
        raise ChecksumSourceError(
            f"{url}: larger than {SUMS_MAX_BYTES // 1024} kB, so not a checksum list; "
            "check the release URL in the lock"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ChecksumSourceError(
            f"{url}: not text, so not a checksum list; check the release URL in the lock"
        ) from None
