"""Where an installed file comes from and what vouches for its sha256.

Settled before the first byte is fetched (see the installer's docstring): the lock
(``pinned``), the release's SHA256SUM read over https now (``release-sha256sum``), the
bundle (``bundle``), or nothing (``unverified``, only with --allow-unverified).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgebundle.bundle import Bundle
from edgebundle.download import fetch
from edgebundle.install_plan import InstallPlan
from edgebundle.layout import Layout
from edgebundle.pins import RELEASE_SHA256SUM, Artifact, Asset
from edgebundle.progress import Log, ProgressFactory, progress_for
from edgebundle.sha256sum import published_sha256

PINNED = "pinned"
BUNDLE = "bundle"
UNVERIFIED = "unverified"


@dataclass(frozen=True)
class Verification:
    """What vouched for one installed file's sha256.

    ``how``: ``pinned`` (the lock quotes a published value; ``source`` is the lock),
    ``release-sha256sum`` (the release's SHA256SUM, read over https at install time;
    ``source`` is its URL), ``bundle`` (the offline bundle's verified record; ``source``
    is the bundle) or ``unverified`` (nothing did: --allow-unverified).
    """

    file: str
    sha256: str
    how: str
    source: str

    def describe(self) -> str:
        if self.how == PINNED:
            return f"{self.file}: sha256 {self.sha256} pinned in {self.source}"
        if self.how == RELEASE_SHA256SUM:
            return (
                f"{self.file}: sha256 {self.sha256} verified against the publisher's "
                f"{self.source} (read now over https; not pinned)"
            )
        if self.how == BUNDLE:
            return f"{self.file}: sha256 {self.sha256} verified against the bundle {self.source}"
        return (
            f"{self.file}: installed unverified (sha256 {self.sha256}); nothing published "
            "vouches for it (--allow-unverified)"
        )

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256, "how": self.how, "source": self.source}


@dataclass(frozen=True)
class Expected:
    """Where to take a file from and the sha256 it must have, settled before fetching."""

    source: str  # URL or bundle path
    sha256: str | None  # None: unverified (allowed by the plan)
    how: str
    origin: str  # the lock, the SHA256SUM URL, the bundle, or ""

    def verification(self, artifact: Artifact, actual: str) -> Verification:
        return Verification(artifact.filename, actual, self.how, self.origin)

    def fetch(self, artifact: Artifact, dest: Path, *, label: str, layout: Layout,
              progress: ProgressFactory | None, downloaded: list[Verification],
              log: Log) -> tuple[Path, Verification]:
        """Download (or copy from the bundle) to ``dest``, checked against this sha256
        or the release's SHA256SUM; the verification is recorded and logged."""
        with progress_for(progress, label) as callback:
            got = fetch(
                self.source,
                dest,
                sha256=self.sha256,
                downloads_dir=layout.downloads,
                progress=callback,
                expected_from=self.origin if self.how == RELEASE_SHA256SUM else None,
            )
        verification = self.verification(artifact, got.sha256)
        downloaded.append(verification)
        log(("WARNING: " if self.sha256 is None else "") + verification.describe())
        return got.path, verification


def expected_for(artifact: Artifact, plan: InstallPlan, bundle: Bundle | None) -> Expected:
    """Where to take a pinned file from and the sha256 it must have, and who says so.

    A bundle carries its own verified value for every file (recorded when it was built),
    so nothing is read from the network then. Otherwise a pinned sha256 wins; a row that
    says ``verify`` gets its value from the release's SHA256SUM, over https, now.
    """
    if bundle is not None:
        path, listed = bundle.asset(artifact)
        return Expected(str(path), listed, BUNDLE, str(bundle.root))
    if artifact.verified:
        return Expected(artifact.url, artifact.sha256, PINNED, str(_pins_path(plan, artifact)))
    if artifact.verify == RELEASE_SHA256SUM:
        sums = artifact.sha256sum_url
        return Expected(
            artifact.url, published_sha256(sums, artifact.filename), RELEASE_SHA256SUM, sums
        )
    artifact.require_verified(plan.allow_unverified)
    return Expected(artifact.url, None, UNVERIFIED, "")


def _pins_path(plan: InstallPlan, artifact: Artifact) -> Path:
    """The lock file that pins ``artifact`` (runtime lock or app/model pins)."""
    return plan.lock.path if isinstance(artifact, Asset) else plan.app_pins.path

