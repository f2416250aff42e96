"""The device agent: makes this device run what the fleet's controller wants it to run.

The agent talks to the central Redis only through its own device keys (and reads of
the fleet's state), so a per-device ACL user is enough:

- **register**: ``HSET info`` {fleet, labels, agent_version, registered_at}; again
  after an outage (Redis may have lost it). The fleet's device set is written by
  ``fleet provision``; only without a provisioned user does the agent ``SADD`` itself.
- **heartbeat**: every :data:`HEARTBEAT_INTERVAL` ``SET hb … EX HEARTBEAT_TTL``; the
  key expiring is how the controller learns the device is offline.
- **watch desired**: ``SUBSCRIBE nudge`` wakes the agent at once, but the nudge is
  only a hint (pub/sub loses messages while disconnected): ``GET desired`` every
  ``poll_interval`` is the source of truth.
- **reconcile** a new generation: fetch the model (and app) of the revision
  (http(s)://, file://, or bundle:<path> under ``--bundle DIR`` for air-gapped
  devices), verify its sha256 *before* anything uses it (a same-sha256 file of another
  revision is hard-linked, then hashed again), place it in
  ``<home>/fleet/revisions/<rev>/``, switch ``<home>/fleet/current`` atomically
  (a new symlink renamed over the old one), restart the runtime (``serve``), run
  doctor's checks on the new revision. A revision on WasmEdge also gets its WasmEdge
  version and plugin build installed by the installer's own code into
  ``<home>/runtime/wasmedge-<version>-<variant>/`` (from the ``--bundle DIR`` when it is
  a bundle built for that runtime, else by the shipped lock's URLs; every archive's
  sha256 pinned by the revision's ``runtime.archives`` or the shipped lock, never by
  the bundle alone, and an unknown one refused as ``install`` refuses it; an installed
  one is reused), and
  ``<home>/runtime/current`` is switched with the revision link. A failed attempt puts
  the previous revision (and its runtime link) back and is retried with backoff up to
  the generation's ``retries``; then the device reports ``failed`` and keeps running
  the previous revision.
- **credentials**: the agent's own ``--redis-url`` carries the device's ACL user; a
  revision's ``sync.redis_url`` gets that user and password only when it names the
  same Redis (scheme, host, port), and the login is checked before the switch: a
  refused one fails the revision.
- **report** an :class:`ActualState` after every step. A report Redis cannot take is
  kept (in memory and in ``<home>/fleet/pending-report.json``) and sent when Redis
  is back; only the newest one is kept, because ``actual`` holds one state, not a log.

What the agent has handled survives a restart (``<home>/fleet/state.json``): a
restarted agent does not redo a generation it finished (healthy or failed).

This module owns the reconcile loop (an attempt, its rollback, doctor's verdict, the
reports and the heartbeat and nudge loops); the pieces it drives are their own modules:
:mod:`edgebundle.fleet.device` (the Redis protocol: register, beat, report, desired,
nudges), :mod:`edgebundle.fleet.staging` (placing, verifying and switching revision
files), :mod:`edgebundle.fleet.wasmedge` (the WasmEdge a revision pins and its
install), :mod:`edgebundle.fleet.credentials` (the device's login on a revision's sync
Redis) and :mod:`edgebundle.runtime.run_child` (the served ``edgebundle run``).

Why it is over 400 lines: :class:`Agent` is one state machine (the handled generation,
the pending report, the running child, Redis up or down) whose loops share that state;
cutting it further would pass that state between modules instead of keeping it in one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from redis.exceptions import RedisError as _RedisPyError

from edgebundle import installer
from edgebundle.config import Settings, redact_url
from edgebundle.device_ids import kept_device_id
from edgebundle.doctor import CheckResult, Report, redis_checks, run_doctor
from edgebundle.errors import (
    ConfigError,
    EdgebundleError,
    StateError,
)
from edgebundle.fleet.credentials import login_refused, with_credentials
from edgebundle.fleet.device import (
    beat,
    is_registered,
    read_desired,
    register,
    report,
    watch_nudges,
)
from edgebundle.fleet.documents import (
    HEARTBEAT_INTERVAL,
    ActualState,
    DesiredState,
    Heartbeat,
    loads,
)
from edgebundle.fleet.manifest import RevisionSpec
from edgebundle.fleet.staging import (
    APP_FILE,
    MODEL_FILE,
    FleetPaths,
    Staging,
    write_json_atomic,
)
from edgebundle.fleet.wasmedge import WantedRuntime, install_wanted
from edgebundle.keys import check_id
from edgebundle.pins import RuntimeLock
from edgebundle.runtime.run_child import RunChild
from edgebundle.sync.client import Client, connect
from edgebundle.tasks import cancel_and_wait

POLL_INTERVAL = 3.0  # s between reads of desired (the nudge only makes it sooner)
BACKOFF_BASE = 1.0  # s before the second attempt; doubles per attempt
BACKOFF_CAP = 30.0
HEALTHZ_TIMEOUT = 120.0  # s a restarted runtime gets to load its model (RunChild's wait)
DEVICE_ID_FILE = "agent-device-id"
ENVIRONMENT_CHECKS = frozenset(redis_checks.IDS)  # doctor ids that do not gate a revision
STOP_GRACE = 20.0  # s a served run gets to stop after SIGTERM, then SIGKILL (RunChild.stop)

Log = Callable[[str], None]

# What a Redis call can raise when the server is down or refuses us.
_REDIS_DOWN = (_RedisPyError, OSError, EdgebundleError)


def parse_labels(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``k=v`` items (from ``--label``) as a dict; ConfigError on a malformed one."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--label {item!r}: use key=value, e.g. --label ring=canary")
        labels[key.strip()] = value.strip()
    return labels


def agent_device_id(settings: Settings) -> str:
    """The configured device id, else one made once and kept in ``<home>/state``."""
    return kept_device_id(settings, DEVICE_ID_FILE, "dev")


class AttemptFailed(EdgebundleError):
    """One attempt at a revision failed; ``doctor`` is set when doctor's checks did."""

    def __init__(self, message: str, doctor: Report | None = None) -> None:
        super().__init__(message)
        self.doctor = doctor


class Agent:
    """One device's agent: ``run_forever()``, or ``step()`` by step (``--once``, tests)."""

    def __init__(self, settings: Settings, redis_url: str, device_id: str, fleet: str,
                 labels: Mapping[str, str] | None = None, bundle_dir: Path | None = None,
                 serve: bool = False, *, log: Log | None = None,
                 poll_interval: float = POLL_INTERVAL, backoff: float = BACKOFF_BASE,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 online_doctor: bool = True) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.device_id = check_id("device", device_id)
        self.fleet = check_id("fleet", fleet)
        self.labels = dict(labels or {})
        self.bundle_dir = bundle_dir
        self.serve = serve
        self.log: Log = log or (lambda line: None)
        self.poll_interval = poll_interval
        self.backoff = backoff
        self.heartbeat_interval = heartbeat_interval
        self.online_doctor = online_doctor
        self.paths = FleetPaths(settings.home / "fleet")
        self.actual = self._load_state()
        self.pending: ActualState | None = self._load_pending()
        self.redis: Client | None = None
        self.registered = False
        self.staging = Staging(self.paths, bundle_dir=bundle_dir,
                               downloads=settings.layout.downloads, log=self.log)
        self.run_child = RunChild(settings.layout.logs / "agent-run.log")
        self._nudged = asyncio.Event()
        self._redis_down = False

    @property
    def child(self) -> subprocess.Popen[bytes] | None:
        """The served ``edgebundle run`` (None: none started)."""
        return self.run_child.process

    @child.setter
    def child(self, process: subprocess.Popen[bytes] | None) -> None:
        """Adopt a running process as the served ``run`` (it is stopped before the next)."""
        self.run_child.process = process

    # --- lifecycle ---------------------------------------------------------------

    async def run_forever(self) -> None:
        """Heartbeat, watch desired and reconcile until cancelled (SIGTERM, Ctrl-C)."""
        self.log(f"agent {self.device_id} of fleet {self.fleet}: "
                 f"Redis {redact_url(self.redis_url)}")
        running = self.paths.current_revision()
        spec = self.staging.revision_spec(running) if running is not None else None
        if self.serve and running is not None and spec is not None:
            await self._restart_runtime(running, spec)
        tasks = [asyncio.create_task(self._heartbeat_loop()),
                 asyncio.create_task(self._nudge_loop())]
        try:
            while True:
                try:
                    await self.step()
                except EdgebundleError as exc:  # e.g. a corrupt desired state: wait for a fix
                    self.log(f"cannot reconcile: {exc}")
                self._nudged.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):  # edgebundle.tasks
                        await self._nudged.wait()
                await self._keep_child_up()
        finally:
            await cancel_and_wait(tasks)
            await self.close()

    async def once(self) -> ActualState:
        """Register, beat, reconcile what is desired now, report; for scripts and tests."""
        try:
            await self._ensure_registered()
            await self._beat_once()
            await self.step()
            return self.actual
        finally:
            await self.close()

    async def close(self) -> None:
        await self._stop_child()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
            self.redis = None

    # --- one pass ------------------------------------------------------------------

    async def step(self) -> None:
        """Send a queued report, read desired, reconcile it if it is a new generation."""
        await self._flush_pending()
        try:
            client = await self._client()
            desired = await read_desired(client, self.device_id)
        except StateError:
            raise  # the controller wrote something unreadable; Redis itself is fine
        except _REDIS_DOWN as exc:
            self._note_redis_down(exc)
            return
        self._note_redis_up()
        if desired is None:
            if self.actual.updated_at == 0.0:  # first contact: say we are here, idle
                await self._report(replace(self.actual, revision=self.paths.current_revision()))
            return
        if desired.generation == self.actual.generation and self.actual.status in (
                "healthy", "failed"):
            return  # done already (a restart must not redo it)
        await self.reconcile(desired)

    async def reconcile(self, desired: DesiredState) -> None:
        """Try ``desired`` up to its retries; report every attempt and the outcome."""
        # Generations only grow, but a controller that lost Redis starts over at 1:
        # any generation other than the handled one is new work.
        first = 1
        if desired.generation == self.actual.generation and self.actual.status == "applying":
            first = self.actual.attempts + 1  # an attempt was cut short by a restart
        attempts = max(1, desired.retries)
        first = min(first, attempts)
        for attempt in range(first, attempts + 1):
            await self._report(ActualState(
                generation=desired.generation, revision=self.paths.current_revision(),
                status="applying", attempts=attempt, last_error=self.actual.last_error
                if self.actual.generation == desired.generation else None,
                doctor_ok=self.actual.doctor_ok, doctor_failed=list(self.actual.doctor_failed),
                running_since=self.actual.running_since))
            self.log(f"{desired.revision} (generation {desired.generation}): applying, "
                     f"attempt {attempt}/{attempts}")
            try:
                doctor, started = await self._attempt(desired)
            except AttemptFailed as exc:
                failed = [c.id for c in revision_failures(exc.doctor)] if exc.doctor else []
                final = attempt == attempts
                await self._report(replace(
                    self.actual, revision=self.paths.current_revision(),
                    status="failed" if final else "applying", last_error=str(exc),
                    doctor_ok=False if exc.doctor else self.actual.doctor_ok,
                    doctor_failed=failed))
                self.log(f"{desired.revision} (generation {desired.generation}): attempt "
                         f"{attempt}/{attempts} failed: {exc}" + ("; giving up" if final else ""))
                if not final:
                    await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), BACKOFF_CAP))
                continue
            await self._report(ActualState(
                generation=desired.generation, revision=desired.revision, status="healthy",
                attempts=attempt, last_error=None, doctor_ok=True,
                doctor_failed=[c.id for c in doctor.checks if c.status == "fail"],
                running_since=started))
            self.log(f"{desired.revision} (generation {desired.generation}): healthy")
            return

    # --- one attempt -----------------------------------------------------------------

    async def _attempt(self, desired: DesiredState) -> tuple[Report, float]:
        """Fetch, verify, switch, restart, check; on failure the previous revision is back."""
        try:  # before anything changes: where the revision syncs, and that we may log in
            refused = await login_refused(self.sync_url(desired.spec))
        except ConfigError as exc:
            raise AttemptFailed(str(exc)) from None
        if refused is not None:
            raise AttemptFailed(refused)
        try:
            rev_dir = await asyncio.to_thread(self.staging.stage, desired.revision, desired.spec)
        except EdgebundleError as exc:
            raise AttemptFailed(str(exc)) from None
        except OSError as exc:
            raise AttemptFailed(f"cannot place revision {desired.revision}: {exc}") from None
        try:  # installed (and verified) now, made current below with the revision
            wanted = WantedRuntime.of(desired.spec)
            runtime = (await asyncio.to_thread(install_wanted, wanted, self.settings.layout,
                                             self.bundle_dir, self.log)
                       if wanted is not None else None)
        except EdgebundleError as exc:
            raise AttemptFailed(str(exc)) from None
        except OSError as exc:
            raise AttemptFailed(f"cannot install the revision's WasmEdge: {exc}") from None
        previous = self.paths.current_revision()
        previous_runtime = self._runtime_link()
        unchanged = previous == desired.revision and self.actual.running_since > 0 and (
            not self.serve or (self.child is not None and self.child.poll() is None))
        # Same revision again (a re-sent generation): it keeps running, and so does its clock.
        started = self.actual.running_since if unchanged else time.time()
        self.staging.switch(desired.revision)
        try:
            if runtime is not None:
                installer.switch_current(self.settings.layout, runtime[0].name)
            if self.serve and not unchanged:
                await self._restart_runtime(desired.revision, desired.spec)
            doctor = await asyncio.to_thread(
                self._doctor, rev_dir, desired.spec, runtime[1] if runtime else None)
            failing = revision_failures(doctor)
            if failing:
                raise AttemptFailed("doctor: " + "; ".join(
                    f"{c.id}: {c.summary}" for c in failing), doctor)
        except (AttemptFailed, EdgebundleError) as exc:
            await self._switch_back(previous, previous_runtime)
            if isinstance(exc, AttemptFailed):
                raise
            raise AttemptFailed(str(exc)) from None
        return doctor, started

    def _runtime_link(self) -> str | None:
        """Where ``<home>/runtime/current`` points now (None: no link)."""
        try:
            return os.readlink(self.settings.layout.runtime_current)
        except OSError:
            return None

    def _running_runtime(self) -> str | None:
        """What the running revision runs on, for reports (see ActualState.runtime)."""
        running = self.paths.current_revision()
        spec = self.staging.revision_spec(running) if running is not None else None
        if spec is None:
            return None
        if WantedRuntime.of(spec) is None:
            return "embedded"
        link = self._runtime_link()
        return Path(link).name if link else None

    async def _switch_back(self, previous: str | None, previous_runtime: str | None) -> None:
        if self._runtime_link() != previous_runtime:
            with contextlib.suppress(EdgebundleError, OSError):
                installer.switch_current(self.settings.layout, previous_runtime)
        if previous is None:
            self.staging.unswitch()
            await self._stop_child()
            return
        self.staging.switch(previous)
        spec = self.staging.revision_spec(previous)
        if self.serve and spec is not None:
            with contextlib.suppress(EdgebundleError):
                await self._restart_runtime(previous, spec)

    def revision_settings(self, rev_dir: Path, spec: RevisionSpec) -> Settings:
        """The settings ``run`` and doctor use for a placed revision."""
        model, runtime = spec.model, spec.runtime.kind
        app = rev_dir / APP_FILE
        return replace(
            self.settings,
            runtime=runtime,
            # A WasmEdge revision runs the WasmEdge the agent installed, never another binary.
            wasmedge=None if runtime == "wasmedge" else self.settings.wasmedge,
            model=rev_dir / MODEL_FILE,
            app=app if app.is_file() else None,
            template=model.template,
            system_prompt=model.system_prompt or self.settings.system_prompt,
            ctx_size=model.ctx_size,
            redis_url=self.sync_url(spec),
            device_id=self.device_id,
        )

    def sync_url(self, spec: RevisionSpec) -> str | None:
        """The Redis a revision's ``run`` syncs through, logged in as this device."""
        return with_credentials(spec.sync.redis_url, self.redis_url) or self.settings.redis_url

    def _doctor(self, rev_dir: Path, spec: RevisionSpec,
                lock: RuntimeLock | None = None) -> Report:
        """Doctor's checks of a revision; ``lock`` pins the WasmEdge it runs on."""
        return run_doctor(self.revision_settings(rev_dir, spec), online=self.online_doctor,
                          lock=lock)

    # --- the runtime (serve=True) ------------------------------------------------------

    async def _restart_runtime(self, revision: str, spec: RevisionSpec) -> None:
        """Stop the running ``edgebundle run`` child, start one for ``revision``, wait healthy."""
        await self._stop_child()
        settings = self.revision_settings(self.paths.revision(revision), spec)
        argv = [sys.executable, "-m", "edgebundle", "run", "--no-fleet",
                "--runtime", settings.runtime,
                "--model", str(settings.model), "--ctx-size", str(settings.ctx_size),
                "--device-id", self.device_id, "--host", settings.host,
                "--port", str(settings.port), "--context-policy", settings.context_policy]
        for flag, value in (("--app", settings.app), ("--template", settings.template),
                            ("--system-prompt", settings.system_prompt)):
            if value:
                argv += [flag, str(value)]
        env = {**os.environ, "EDGEBUNDLE_HOME": str(self.settings.home)}
        env.pop("EDGEBUNDLE_REDIS_URL", None)
        if settings.redis_url:  # by environment: a password in argv is visible to ps
            env["EDGEBUNDLE_REDIS_URL"] = settings.redis_url
        child = self.run_child.start(argv, env)
        self.log(f"{revision}: started edgebundle run (pid {child.pid}) on "
                 f"{settings.host}:{settings.port}")
        await self.run_child.wait_healthy(f"http://{settings.host}:{settings.port}/healthz",
                                          HEALTHZ_TIMEOUT)

    async def _keep_child_up(self) -> None:
        """Start ``edgebundle run`` again if it died between switches."""
        child = self.child
        if not self.serve or child is None or child.poll() is None:
            return
        running = self.paths.current_revision()
        spec = self.staging.revision_spec(running) if running is not None else None
        if running is None or spec is None:
            return
        self.log(f"{running}: edgebundle run exited with {child.returncode}; restarting it")
        try:
            await self._restart_runtime(running, spec)
        except EdgebundleError as exc:
            self.log(f"{running}: {exc}")

    async def _stop_child(self) -> None:
        """Stop the served ``run`` (:meth:`RunChild.stop`); heartbeats go on meanwhile."""
        await self.run_child.stop(STOP_GRACE)

    # --- Redis: reports, heartbeats, nudges ----------------------------------------------

    async def _client(self) -> Client:
        if self.redis is None:
            self.redis = await connect(self.redis_url)
        return self.redis

    async def _report(self, state: ActualState) -> None:
        """Record ``state`` locally, then send it; keep it for later if Redis is down."""
        state = replace(state, updated_at=time.time(), runtime=self._running_runtime())
        self.actual = state
        write_json_atomic(self.paths.state_file, state.to_json())
        self.pending = state
        write_json_atomic(self.paths.pending_report, state.to_json())
        await self._flush_pending()

    async def _flush_pending(self) -> None:
        pending = self.pending
        if pending is None:
            return
        try:
            await report(await self._client(), self.device_id, pending)
        except _REDIS_DOWN as exc:
            self._note_redis_down(exc)
            return
        self._note_redis_up()
        if self.pending is pending:
            self.pending = None
            with contextlib.suppress(FileNotFoundError):
                self.paths.pending_report.unlink()

    async def _ensure_registered(self) -> None:
        """Register, and again whenever Redis lost our info (a restart without persistence,
        shorter than the client's retries, is otherwise invisible to us)."""
        client = await self._client()
        if self.registered and await is_registered(client, self.device_id):
            return
        await register(client, self.device_id, self.fleet, self.labels)
        if self.pending is None and self.actual.updated_at:
            # Redis may have lost our last report too: send it again, unchanged.
            self.pending = self.actual
        self.registered = True
        self.log(f"registered in fleet {self.fleet} with labels {self.labels}")

    async def _beat_once(self) -> None:
        await beat(await self._client(), self.device_id, Heartbeat(
            at=time.time(), generation=self.actual.generation,
            revision=self.paths.current_revision(), doctor_ok=self.actual.doctor_ok))

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._ensure_registered()
                await self._beat_once()
                self._note_redis_up()
                await self._flush_pending()
            except _REDIS_DOWN as exc:
                self.registered = False  # Redis may come back empty: register again
                self._note_redis_down(exc)
            await asyncio.sleep(self.heartbeat_interval)

    async def _nudge_loop(self) -> None:
        """Wake the reconcile loop on a nudge; resubscribe after an outage."""
        while True:
            try:
                await watch_nudges(await self._client(), self.device_id, self.poll_interval,
                                   self._nudged.set)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (the poll of desired covers any pub/sub trouble)
                await asyncio.sleep(self.poll_interval)

    def _note_redis_down(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            self.log(f"Redis {redact_url(self.redis_url)} unreachable ({type(exc).__name__}); "
                     "reports are kept until it is back")

    def _note_redis_up(self) -> None:
        if self._redis_down:
            self._redis_down = False
            self.log(f"Redis {redact_url(self.redis_url)} reachable again")

    # --- local state -----------------------------------------------------------------------

    def _load_state(self) -> ActualState:
        with contextlib.suppress(OSError, ValueError, EdgebundleError, KeyError, TypeError):
            data = loads(self.paths.state_file.read_text(), "agent state")
            if data is not None:
                return ActualState.from_json(data)
        return ActualState(revision=self.paths.current_revision())

    def _load_pending(self) -> ActualState | None:
        with contextlib.suppress(OSError, ValueError, EdgebundleError, KeyError, TypeError):
            data = loads(self.paths.pending_report.read_text(), "pending report")
            if data is not None:
                return ActualState.from_json(data)
        return None


async def run_until_stopped(agent: Agent) -> None:
    """``agent.run_forever()`` until SIGTERM or Ctrl-C, then a clean stop (child included)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await agent.run_forever()


def fleet_managed_run(settings: Settings, log: Log) -> None:
    """``edgebundle run`` on a device of a fleet: the agent serves the fleet's revision."""
    if not settings.redis_url or not settings.fleet:
        raise ConfigError("a fleet needs its Redis: pass --redis-url URL or set "
                          "EDGEBUNDLE_REDIS_URL (or unset EDGEBUNDLE_FLEET)")
    agent = Agent(settings, settings.redis_url, agent_device_id(settings), settings.fleet,
                  serve=True, log=log)
    if agent.paths.current_revision() is None:
        log(f"fleet {settings.fleet}: nothing to serve until its controller assigns a revision")
    asyncio.run(run_until_stopped(agent))


def revision_failures(doctor: Report) -> list[CheckResult]:
    """The failed checks that speak against the revision.

    Redis being unreachable is the network's state, not the revision's: failing a
    rollout over it would roll a fleet back for an outage, and the controller already
    sees an unreachable device as offline (its heartbeat expires).
    """
    return [c for c in doctor.checks if c.status == "fail" and c.id not in ENVIRONMENT_CHECKS]
