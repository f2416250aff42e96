"""The agent's file staging: a revision's files placed, verified and switched to atomically.

Owns ``<home>/fleet`` on the device (:class:`FleetPaths`): ``revisions/<rev>/`` holds a
revision's model (and app), fetched (http(s)://, file://, or bundle:<path> under the
agent's ``--bundle DIR``) and verified by sha256 *before* anything uses them; the same
bytes of another revision are hard-linked and hashed again instead of fetched.
``revision.json`` is written last, so a directory without it is incomplete, and
``current`` is switched by renaming a new symlink over the old one (never missing).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from edgebundle import files
from edgebundle.download import fetch, sha256_file
from edgebundle.errors import ConfigError, EdgebundleError
from edgebundle.fleet.documents import dumps
from edgebundle.fleet.manifest import App, Model, RevisionSpec
from edgebundle.keys import check_id
from edgebundle.pins import load_app_pins
from edgebundle.resources import app_pins_file

MODEL_FILE = "model.gguf"
APP_FILE = "app.wasm"
BUILTIN = "builtin:"  # an app shipped with edgebundle (the manifest's default: edgechat)
REVISION_FILE = "revision.json"  # written last: a revision dir without it is incomplete

Log = Callable[[str], None]


@dataclass(frozen=True)
class FleetPaths:
    """Where the agent keeps revisions and its own state, below ``<home>/fleet``."""

    root: Path

    @property
    def revisions(self) -> Path:
        return self.root / "revisions"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def pending_report(self) -> Path:
        return self.root / "pending-report.json"

    def revision(self, revision: str) -> Path:
        return self.revisions / check_id("revision", revision)

    def current_revision(self) -> str | None:
        """The revision ``current`` points at, None when there is none yet."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        return Path(target).name


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    files.write_text(path, dumps(value))


class Staging:
    """Places revisions below ``paths``; ``bundle_dir`` resolves ``bundle:`` URLs and
    ``downloads`` is where fetches are kept while they run."""

    def __init__(self, paths: FleetPaths, *, bundle_dir: Path | None, downloads: Path,
                 log: Log) -> None:
        self.paths = paths
        self.bundle_dir = bundle_dir
        self.downloads = downloads
        self.log = log

    def stage(self, revision: str, spec: RevisionSpec) -> Path:
        """``revisions/<rev>/`` with verified files; reused when an earlier run made it."""
        target = self.paths.revision(revision)
        if (target / REVISION_FILE).is_file():
            return target
        self.paths.revisions.mkdir(parents=True, exist_ok=True)
        work = self.paths.revisions / f".{revision}.{secrets.token_hex(4)}.tmp"
        work.mkdir()
        try:
            self._place(spec.model, work / MODEL_FILE, "model")
            if spec.app.url.startswith(BUILTIN):
                check_builtin_app(spec.app)  # shipped with edgebundle: nothing to place
            else:
                self._place(spec.app, work / APP_FILE, "app")
            write_json_atomic(work / REVISION_FILE, {
                "revision": revision, "spec": spec.to_json(), "placed_at": time.time()})
            if target.exists():  # an incomplete dir of an interrupted run
                shutil.rmtree(target)
            os.replace(work, target)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return target

    def switch(self, revision: str) -> None:
        """Point ``current`` at ``revisions/<rev>`` in one rename (never a missing link)."""
        files.switch_link(self.paths.current, Path("revisions") / revision)

    def unswitch(self) -> None:
        """No current revision any more (back to before the first one)."""
        try:
            self.paths.current.unlink()
        except FileNotFoundError:
            pass

    def revision_spec(self, revision: str) -> RevisionSpec | None:
        """The spec a placed revision was staged with (None: not placed, or unreadable)."""
        return placed_spec(self.paths.revision(revision) / REVISION_FILE)

    def _place(self, item: Model | App, dest: Path, what: str) -> None:
        sha256 = item.sha256
        source = self._source(item.url)  # a bad URL fails even if the bytes are here
        local = self._already_have(sha256, dest.name)
        if local is not None:  # same bytes in another revision (e.g. a prompt-only change)
            os.link(local, dest)
            # Hashed again once linked (the same inode): that revision's copy may have been
            # damaged since it was verified, and then it is fetched again instead.
            if sha256_file(dest) == sha256.lower():
                return
            dest.unlink()
            self.log(f"{local}: no longer has sha256 {sha256.lower()[:12]}…; fetching the "
                     f"{what} again")
        fetch(source, dest, sha256=sha256.lower(), downloads_dir=self.downloads)

    def _already_have(self, sha256: str, name: str) -> Path | None:
        """A verified file with this sha256 in a completed revision dir, if any."""
        if not self.paths.revisions.is_dir():
            return None
        for revision_file in self.paths.revisions.glob(f"*/{REVISION_FILE}"):
            spec = placed_spec(revision_file)
            if spec is None:
                continue
            candidate = revision_file.parent / name
            if sha256.lower() in (spec.model.sha256, spec.app.sha256) and candidate.is_file():
                return candidate
        return None

    def _source(self, url: str) -> str:
        """http(s):// and file:// as they are; bundle:<path> below the bundle dir."""
        if not url.startswith("bundle:"):
            return url
        if self.bundle_dir is None:
            raise ConfigError(f"{url}: this revision comes from an offline bundle; "
                              "start the agent with --bundle DIR")
        relative = Path(unquote(url[len("bundle:"):]))
        path = (self.bundle_dir / relative).resolve()
        if relative.is_absolute() or not path.is_relative_to(self.bundle_dir.resolve()):
            raise ConfigError(f"{url}: a bundle path must stay inside the bundle dir")
        if not path.is_file():
            raise ConfigError(f"{url}: {path} is not in the bundle; copy the bundle again")
        return str(path)


def placed_spec(revision_file: Path) -> RevisionSpec | None:
    """The spec in a placed revision's ``revision.json`` (None: missing or unreadable)."""
    try:
        return RevisionSpec.from_json(json.loads(revision_file.read_text())["spec"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_builtin_app(app: App) -> None:
    """A ``builtin:<name>`` app must be the build this edgebundle ships (same sha256)."""
    name = app.url[len(BUILTIN):]
    try:
        shipped = load_app_pins(app_pins_file()).app(name).sha256
    except EdgebundleError as exc:
        raise ConfigError(f"builtin:{name}: {exc}") from None
    wanted = app.sha256.lower()
    if wanted != shipped.lower():
        raise ConfigError(f"builtin:{name}: this device ships sha256 {shipped[:12]}…, the "
                          f"revision wants {wanted[:12]}…; upgrade edgebundle on the device")
