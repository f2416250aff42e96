"""How this device can get the pinned WasmEdge: advice that works here.

``./install.sh`` installs WasmEdge only where the lock pins both archives (runtime and
WASI-NN plugin) for this os/arch and plugin variant, each with a published sha256 or
checked against its release's SHA256SUM at install time (or from a bundle, or with
``--allow-unverified``); anywhere else it says so and the device runs the embedded
runtime. So "run ./install.sh" is advice only where those pins verify. Elsewhere the
hint says what does work: a WasmEdge installed and checked by hand, or one already on
the device, named with ``--wasmedge`` (and its plugin directory with
``WASMEDGE_PLUGIN_PATH``).
"""

from __future__ import annotations

from pathlib import Path

from edgebundle.errors import PinError
from edgebundle.host import HostInfo
from edgebundle.pins import Asset, RuntimeLock

# Every WasmEdge release since 0.11.2 attaches this file (docs/wasmedge-facts.md).
_RELEASES = "https://github.com/WasmEdge/WasmEdge/releases/download/"


def pinned_assets(
    lock: RuntimeLock, host: HostInfo, variant: str | None = None
) -> tuple[Asset, Asset] | None:
    """The runtime and plugin archives install.sh would pick here; None if none is pinned."""
    from edgebundle.install_plan import AUTO, resolve_variant  # the installer's own choice

    try:
        chosen = variant or resolve_variant(lock, host, AUTO)
        # the runtime of the plugin's dist, as the installer pairs them
        return (lock.runtime_for(host.os, host.arch, chosen),
                lock.plugin_asset(host.os, host.arch, chosen))
    except PinError:
        return None


def install_sh_works(lock: RuntimeLock, host: HostInfo, variant: str | None = None) -> bool:
    """Whether plain ``./install.sh`` installs a verified WasmEdge on this host."""
    assets = pinned_assets(lock, host, variant)
    return assets is not None and all(a.checkable for a in assets)


def wasmedge_install_hint(lock: RuntimeLock, host: HostInfo, variant: str | None = None) -> str:
    """How to get the WasmEdge ``lock`` pins onto this host, in words that work here."""
    version = lock.wasmedge_version
    assets = pinned_assets(lock, host, variant)
    library = Path(lock.plugin_library).stem + (".dylib" if host.os == "darwin" else ".so")
    if assets is None:
        where = f"{host.os}/{host.arch}" + (f" variant {variant}" if variant else "")
        return (
            f"./install.sh cannot install WasmEdge here: {lock.path} pins none for {where}; "
            f"install WasmEdge {version} yourself and pass --wasmedge DIR/bin/wasmedge (or set "
            f"EDGEBUNDLE_WASMEDGE), its {library} in DIR/plugin or named by WASMEDGE_PLUGIN_PATH"
        )
    runtime, plugin = assets
    unverified = [a for a in assets if not a.checkable]
    if not unverified:
        return (
            f"run ./install.sh: it installs the pinned WasmEdge {version} with plugin build "
            f"{lock.plugin_build_for(host.os, host.arch, plugin.variant)} ({plugin.variant}), "
            f"each archive sha256-checked (against {lock.path} or its release's SHA256SUM)"
        )
    names = " and ".join(a.filename for a in unverified)
    # DIR/plugin: where WasmEdge looks by itself (<lib>/../plugin, outside /usr).
    return (
        f"./install.sh will not download {names}: {lock.path} has no published sha256 for "
        f"{'them' if len(unverified) > 1 else 'it'}. By hand: download {runtime.url} and "
        f"{_how_to_check(runtime, lock)}, unpack it to DIR and put {library} from "
        f"{plugin.url} ({_how_to_check(plugin, lock)}) in DIR/plugin, then pass --wasmedge "
        "DIR/bin/wasmedge; or build a bundle on a connected machine (`edgebundle bundle build "
        "BUNDLE`; check the sha256s it prints against the releases') and run "
        "`./install.sh --bundle BUNDLE`"
    )


def _how_to_check(asset: Asset, lock: RuntimeLock) -> str:
    if asset.verified:
        return f"check its sha256 is {asset.sha256}, as {lock.path.name} pins"
    if asset.url.startswith(_RELEASES):
        release = asset.url.rsplit("/", 1)[0]
        return f"check its sha256 against {release}/SHA256SUM"
    return "no checksum is published for it: compare its sha256 with a copy you trust"
