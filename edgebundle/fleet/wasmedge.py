"""The WasmEdge a fleet revision runs on: what it pins, and installing it on the device.

Owns :class:`WantedRuntime` (``spec.runtime`` of kind wasmedge), :func:`pin_archives`
(every archive's sha256 pinned by the revision or the shipped lock, never by a bundle
alone) and :func:`install_wanted` (the installer's own code, into a versioned dir that
the agent makes current together with the revision).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgebundle import installer
from edgebundle.bundle import MANIFEST as BUNDLE_MANIFEST
from edgebundle.errors import ChecksumMismatchError, ConfigError, EdgebundleError
from edgebundle.fleet.manifest import RevisionSpec
from edgebundle.host import detect
from edgebundle.layout import Layout
from edgebundle.pins import RuntimeLock

Log = Callable[[str], None]


@dataclass(frozen=True)
class WantedRuntime:
    """The WasmEdge a revision runs on (``spec.runtime`` of kind wasmedge).

    ``archives``: the sha256 the manifest pins for release archives, by file name.
    """

    version: str
    build: str
    variant: str
    archives: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"WasmEdge {self.version} with plugin build {self.build} ({self.variant})"

    @staticmethod
    def of(spec: RevisionSpec) -> WantedRuntime | None:
        """None for an embedded revision (which leaves ``runtime/current`` alone)."""
        runtime = spec.runtime
        if runtime.kind != "wasmedge" or runtime.wasmedge is None or runtime.plugin is None:
            return None  # the schema sees to it that a wasmedge runtime names both
        return WantedRuntime(runtime.wasmedge, runtime.plugin.build, runtime.plugin.variant,
                             dict(runtime.archives))


def install_wanted(wanted: WantedRuntime, layout: Layout, bundle_dir: Path | None,
                   log: Log) -> tuple[Path, RuntimeLock]:
    """Install ``wanted`` in its versioned dir (not current yet) by the installer's code.

    Returns the dir and the lock doctor compares the running WasmEdge with. The
    archives come from the bundle (``--bundle DIR`` with a bundle.json) or the shipped
    lock's URLs, and each one's sha256 must be pinned by the revision's
    ``runtime.archives`` or published in the shipped lock (:func:`pin_archives`): a
    bundle's own bundle.json and lock copy never vouch for a runtime alone. The
    installer verifies every archive before unpacking it; an installed runtime is
    reused.
    """
    host = detect()
    plans = []
    if bundle_dir is not None and (bundle_dir / BUNDLE_MANIFEST).is_file():
        plans.append(installer.make_plan(host, bundle=bundle_dir,
                                         require_wasmedge=True))
    plans.append(installer.make_plan(host, require_wasmedge=True))
    for plan in plans:
        lock = plan.lock
        if wanted.variant not in lock.variants(host.os, host.arch) or (
                lock.wasmedge_version,
                lock.plugin_build_for(host.os, host.arch, wanted.variant),
        ) != (wanted.version, wanted.build):
            continue
        plan = pin_archives(plan, wanted, shipped=plans[-1].lock)
        lock = plan.lock
        target, unpacked = installer.install_runtime(
            replace(plan, variant=wanted.variant), layout, log=log)
        where = f"the bundle {bundle_dir}" if plan.bundle else f"the lock {lock.path}"
        log(f"{wanted.label}: installed in {target} from {where}" if unpacked
                 else f"{wanted.label}: already installed in {target}")
        return target, lock
    for installed in installer.list_runtimes(layout):  # pinned nowhere now, but here
        if (installed.wasmedge_version, installed.plugin_build, installed.variant) == (
                wanted.version, wanted.build, wanted.variant):
            log(f"{wanted.label}: already installed in {installed.path}")
            shipped = plans[-1].lock
            # No lock pins this build: doctor is to expect the installed one for every
            # variant (the shipped rows' own builds are of another release).
            assets = tuple(replace(a, build=None) for a in shipped.assets)
            return installed.path, replace(
                shipped, wasmedge_version=wanted.version, plugin_build=wanted.build,
                assets=assets,
                plugin_reported_version=None)  # no lock says what this build prints
    bundle = f" nor in the bundle {bundle_dir}" if len(plans) > 1 else ""
    raise ConfigError(
        f"{wanted.label} is pinned neither in the shipped lock{bundle}: build a bundle "
        "for it (edgebundle bundle build) and start the agent with --bundle DIR")


def pin_archives(plan: installer.InstallPlan, wanted: WantedRuntime,
                 shipped: RuntimeLock) -> installer.InstallPlan:
    """``plan`` with the two archives it installs pinned from outside the bundle.

    Each one's sha256 comes from the revision (``wanted.archives``, by file name) or
    else from the shipped lock where that publishes one. A bundle's archive whose
    sha256 neither pins is refused (ConfigError), and so is one whose bundle sha256
    differs from the pin; an unpinned archive of the shipped lock is left to the
    installer, which refuses an unknown sha256 itself.
    """
    host, lock = plan.host, plan.lock
    try:
        needed = {lock.runtime_for(host.os, host.arch, wanted.variant),
                  lock.plugin_asset(host.os, host.arch, wanted.variant)}
    except EdgebundleError:
        return plan  # nothing pinned for this machine: the installer says so
    published = {a.filename: a.sha256.lower() for a in shipped.assets if a.verified}
    assets = []
    for asset in lock.assets:
        if asset in needed:
            pin = wanted.archives.get(asset.filename) or published.get(asset.filename)
            where = ("the revision's runtime.archives" if asset.filename in wanted.archives
                     else f"the shipped lock {shipped.path}")
            if pin is None and plan.bundle is not None:
                raise ConfigError(
                    f"{asset.filename} (sha256 {asset.sha256}) is vouched for only by the "
                    f"bundle {plan.bundle} itself: pin it in the manifest, spec.runtime.archives:"
                    f" {{{asset.filename}: <its sha256 from the release's SHA256SUM>}}")
            if pin is not None and asset.verified and asset.sha256.lower() != pin:
                holder = f"the bundle {plan.bundle}" if plan.bundle else f"the lock {lock.path}"
                raise ChecksumMismatchError(
                    f"{asset.filename}: sha256 mismatch: {holder} has {asset.sha256}, "
                    f"{where} pins {pin}; an altered bundle, or another release: fix the pin "
                    "or rebuild the bundle")
            if pin is not None:
                asset = replace(asset, sha256=pin)
        assets.append(asset)
    return replace(plan, lock=replace(lock, assets=tuple(assets)))
