"""The sync Redis, checked the way an operator would before trusting it with conversations.

``redis.reachable``: it answers PING with the configured credentials. One attempt,
one-second timeouts, no retries: a doctor must answer quickly, and a Redis that needs
retries to answer PING is worth a failing check. The password never appears in a
summary (config.redact_url).

Once it answers, and when asked (``central_redis``: ``edgebundle doctor`` asks; ``run``'s
preflight and a fleet agent's checks of a revision do not), as the configured user (on
a cluster: on every primary):

- ``redis.version``: 7.0 or newer, what Redis Functions need (edgebundle's Lua is one
  Functions library, :mod:`edgebundle.sync.lua`). From ``HELLO``, which any user may send.
- ``redis.topology``: standalone or a cluster (its primaries; a cluster not ``ok`` fails).
- ``redis.persistence``: ``appendonly``/``appendfsync`` (and RDB ``save``): no
  persistence at all loses every thread and the functions at a restart (fail); RDB
  only, or an AOF never fsynced, loses the last writes (warn).
- ``redis.maxmemory_policy``: anything but ``noeviction`` may evict a thread's keys
  (every one has a TTL, so ``volatile-*`` too) and drop it silently (fail).
- ``redis.functions``: the library of this version answers (``eb_<v>_version``). Missing
  is a warning where this user may load it (its first sync call does) and a failure
  where it may not (a device: an admin runs ``edgebundle fleet load-functions``).
- ``redis.permissions``: the user can do what the sync core and the agent need and
  nothing more. Probed only with commands that change nothing whatever the answer:
  reads, PEXPIRE/SREM/PUBLISH on keys, members and channels that do not exist, EVAL of
  ``return 1``, FUNCTION LOAD of a library with no function (refused either way),
  CONFIG GET, SCAN of one key. A device user (``fleet provision``) passes, and the
  detail says whether it may write threads itself (``--access direct``) or only
  through the sync proxy (``proxied``: such a user connecting to Redis directly
  fails, with the fix); a user that
  may also run EVAL, CONFIG, SCAN or write another device's keys is a warning (fine
  for a private Redis, not for a central one); one that lacks what is needed fails.
  Refused probes are what an ACL LOG records: a device's doctor adds a few entries.

A device user may not read CONFIG: persistence and eviction then skip, saying to run
doctor with an admin URL.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgebundle.config import Settings, redact_url
from edgebundle.doctor.context import Context
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn

if TYPE_CHECKING:
    import redis

REACHABLE = "redis.reachable"
VERSION = "redis.version"
TOPOLOGY = "redis.topology"
PERSISTENCE = "redis.persistence"
EVICTION = "redis.maxmemory_policy"
FUNCTIONS = "redis.functions"
PERMISSIONS = "redis.permissions"
# Facts about the Redis a device uses, not about the revision it runs (a fleet agent
# does not fail a revision on them).
IDS = (REACHABLE, VERSION, TOPOLOGY, PERSISTENCE, EVICTION, FUNCTIONS, PERMISSIONS)

TIMEOUT_SECONDS = 1.0
MIN_VERSION = (7, 0)
_AUTH_WORDS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password")
_ADMIN_HINT = "run `edgebundle doctor --redis-url ADMIN_URL` (a user that may read CONFIG)"


def checks(ctx: Context) -> list[CheckResult]:
    url = ctx.settings.redis_url
    if url is None:
        return [skip(REACHABLE, "no Redis configured (--redis-url or EDGEBUNDLE_REDIS_URL)")]
    if not ctx.online:
        return [skip(REACHABLE, f"offline checks only; {redact_url(url)} not contacted")]
    reachable = ping(url)
    if reachable.status != "ok" or not ctx.central_redis:
        return [reachable]
    return [reachable, *central(url, ctx.settings)]


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def _scrub(message: str, url: str) -> str:
    password = urlsplit(url).password
    return message.replace(password, "***") if password else message


def _client(url: str) -> redis.Redis:
    # Imported here: redis-py takes ~0.1 s to import, and offline doctor never needs it.
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=TIMEOUT_SECONDS,
                                socket_connect_timeout=TIMEOUT_SECONDS,
                                retry=Retry(NoBackoff(), 0), decode_responses=True)


def ping(url: str) -> CheckResult:
    import redis

    where = _where(url)
    has_password = urlsplit(url).password is not None
    client = _client(url)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return _auth_failed(url, where, has_password, str(exc))
    except redis.ResponseError as exc:
        if any(word.lower() in str(exc).lower() for word in _AUTH_WORDS):
            return _auth_failed(url, where, has_password, str(exc))
        return fail(
            REACHABLE,
            f"Redis at {where} answered PING with an error: {_scrub(str(exc), url)}",
            "check the Redis user's ACL allows PING",
        )
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        return fail(
            REACHABLE,
            f"cannot reach redis at {where}: {_scrub(str(exc), url) or type(exc).__name__}",
            "start Redis there, or fix --redis-url / EDGEBUNDLE_REDIS_URL (and any firewall)",
        )
    finally:
        client.close()
    return ok(REACHABLE, f"PONG from {redact_url(url)}")


def _auth_failed(url: str, where: str, has_password: bool, message: str) -> CheckResult:
    if not has_password:
        return fail(
            REACHABLE,
            f"Redis at {where} requires a password and none was given",
            "put it in the URL: redis://:PASSWORD@host:port (or user:PASSWORD@ for an ACL user)",
        )
    return fail(
        REACHABLE,
        f"Redis at {where} refused the password ({_scrub(message, url)})",
        "fix the password in --redis-url / EDGEBUNDLE_REDIS_URL (redis://user:PASSWORD@host:port)",
    )


# -- the central Redis, as the configured user -----------------------------------------


@dataclass
class Server:
    """What one doctor run learnt about the Redis, and a client per primary."""

    url: str
    client: redis.Redis
    user: str
    name: str  # redis, valkey …
    version: tuple[int, ...]
    version_text: str
    cluster: bool
    primaries: list[tuple[str, redis.Redis]]  # (host:port, client): the node itself if standalone

    def close(self) -> None:
        for _, node in self.primaries:
            if node is not self.client:
                node.close()
        self.client.close()


def central(url: str, settings: Settings) -> list[CheckResult]:
    """Every check after ``redis.reachable`` passed (the Redis answered PING)."""
    import redis

    try:
        server = _connect(url)
    except redis.RedisError as exc:
        return [fail(VERSION, f"Redis at {_where(url)} would not say what it is: "
                              f"{_scrub(str(exc), url)}", "check the Redis (HELLO must work)")]
    try:
        steps: list[tuple[str, Callable[[], CheckResult]]] = [
            (VERSION, lambda: _version(server)),
            (TOPOLOGY, lambda: _topology(server)),
            (PERSISTENCE, lambda: _persistence(server)),
            (EVICTION, lambda: _eviction(server)),
            (FUNCTIONS, lambda: _functions(server)),
            (PERMISSIONS, lambda: _permissions(server, settings)),
        ]
        results = []
        for check_id, step in steps:
            try:
                results.append(step())
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                results.append(fail(check_id, f"lost Redis at {_where(url)} while checking: "
                                              f"{_scrub(str(exc), url) or type(exc).__name__}",
                                    "check the Redis and the network, then run doctor again"))
            except redis.RedisError as exc:  # an answer no check expects: say it, go on
                results.append(fail(check_id, f"Redis at {_where(url)} refused the check: "
                                              f"{_scrub(str(exc), url)}",
                                    "check the Redis and the user's ACL, then run doctor again"))
        return results
    finally:
        server.close()


def _connect(url: str) -> Server:
    import redis

    client = _client(url)
    try:
        hello = _command(client, "HELLO")
        info = hello if isinstance(hello, dict) else dict(zip(hello[::2], hello[1::2], strict=True))
        text = str(info.get("version", "0"))
        version = tuple(int(part) for part in text.split(".") if part.isdigit())
        cluster = str(info.get("mode")) == "cluster"
        try:
            user = str(_command(client, "ACL", "WHOAMI"))
        except redis.ResponseError:
            user = urlsplit(url).username or "default"
        primaries: list[tuple[str, redis.Redis]] = [(_where(url), client)]
        if cluster:
            primaries = [(f"{host}:{port}", client if (host, port) == _address(client)
                          else _node(url, host, port))
                         for host, port in _cluster_primaries(client)]
    except BaseException:
        client.close()
        raise
    return Server(url, client, user, str(info.get("server", "redis")), version, text, cluster,
                  primaries)


def _command(client: redis.Redis, *args: Any) -> Any:
    """One command, whatever it is (redis-py's sync execute_command is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _address(client: redis.Redis) -> tuple[str, int]:
    kwargs = client.connection_pool.connection_kwargs
    return str(kwargs.get("host")), int(kwargs.get("port", 6379))


def _node(url: str, host: str, port: int) -> redis.Redis:
    """A client of one cluster node: ``url`` (user, password, scheme, db) at host:port."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{host}]" if ":" in host else host
    netloc = f"{userinfo}@{address}:{port}" if userinfo else f"{address}:{port}"
    return _client(parts._replace(netloc=netloc).geturl())


def _cluster_primaries(client: redis.Redis) -> list[tuple[str, int]]:
    """(host, port) of every primary that serves slots, from CLUSTER SLOTS
    (``[[start, end, [host, port, id, …], replicas…], …]``)."""
    return sorted({(str(entry[2][0]), int(entry[2][1]))
                   for entry in _command(client, "CLUSTER SLOTS")})


def _version(server: Server) -> CheckResult:
    if server.version[:2] < MIN_VERSION:
        return fail(VERSION, f"{server.name} {server.version_text} is older than 7.0: "
                             "edgebundle runs its Lua as Redis Functions (FCALL), which "
                             "need Redis 7.0 or newer",
                    "upgrade the Redis to 7.0 or newer (or Valkey 7.2 or newer)")
    return ok(VERSION, f"{server.name} {server.version_text} (Functions: 7.0 or newer)")


def _topology(server: Server) -> CheckResult:
    import redis

    if not server.cluster:
        return ok(TOPOLOGY, f"standalone at {_where(server.url)}")
    nodes = ", ".join(address for address, _ in server.primaries)
    try:
        info = _command(server.client, "CLUSTER INFO")
    except redis.ResponseError:  # a device user may not ask: CLUSTER SLOTS was enough
        info = None
    state = _cluster_state(info)
    if state not in (None, "ok"):
        return fail(TOPOLOGY, f"Redis Cluster of {len(server.primaries)} primaries ({nodes}) "
                              f"is not ok (cluster_state:{state}): threads in its missing "
                              "slots cannot be reached",
                    "fix the cluster (redis-cli --cluster check HOST:PORT)")
    return ok(TOPOLOGY, f"Redis Cluster of {len(server.primaries)} primaries: {nodes}")


def _cluster_state(info: Any) -> str | None:
    """cluster_state from CLUSTER INFO (text, or a dict when redis-py parsed it)."""
    if isinstance(info, dict):
        return str(info.get("cluster_state"))
    for line in str(info or "").splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return None


def _config(server: Server, *names: str) -> list[tuple[str, dict[str, str]]] | None:
    """CONFIG GET on every primary; None when this user may not (a device user)."""
    import redis

    values = []
    for address, node in server.primaries:
        try:
            got: dict[str, str] = {}
            for name in names:
                got.update({str(key): str(value)
                            for key, value in node.config_get(name).items()})
        except redis.exceptions.NoPermissionError:
            return None
        values.append((address, got))
    return values


def _worst(results: Sequence[CheckResult]) -> CheckResult:
    order = {"fail": 0, "warn": 1, "skip": 2, "ok": 3}
    return min(results, key=lambda result: order[result.status])


def _persistence(server: Server) -> CheckResult:
    config = _config(server, "appendonly", "appendfsync", "save")
    if config is None:
        return skip(PERSISTENCE, f"user {server.user} may not read CONFIG (a device user: "
                                 f"as it should be); {_ADMIN_HINT}")
    results = [_node_persistence(address, values, server.cluster) for address, values in config]
    return _worst(results)


def _node_persistence(address: str, values: dict[str, str], cluster: bool) -> CheckResult:
    where = f" on {address}" if cluster else ""
    aof, fsync, save = values.get("appendonly"), values.get("appendfsync"), values.get("save")
    conf = "CONFIG SET appendonly yes; CONFIG SET appendfsync everysec (and in redis.conf)"
    if aof == "yes" and fsync in ("always", "everysec"):
        loss = "nothing it acknowledged" if fsync == "always" else "at most about a second"
        return ok(PERSISTENCE, f"append-only file on, appendfsync {fsync}{where}: a power "
                               f"cut loses {loss}")
    if aof == "yes":
        return warn(PERSISTENCE, f"append-only file on but appendfsync {fsync}{where}: the OS "
                                 "decides when it reaches the disk, a power cut can lose the "
                                 "last ~30 s of conversations", "CONFIG SET appendfsync everysec "
                                                                "(and in redis.conf)")
    if save:
        return warn(PERSISTENCE, f"snapshots only (save {save}){where}, no append-only file: a "
                                 "crash loses every change since the last snapshot", conf)
    return fail(PERSISTENCE, f"no persistence{where} (appendonly no, save \"\"): a restart "
                             "loses every thread and the edgebundle functions", conf)


def _eviction(server: Server) -> CheckResult:
    config = _config(server, "maxmemory-policy", "maxmemory")
    if config is None:
        return skip(EVICTION, f"user {server.user} may not read CONFIG (a device user: "
                              f"as it should be); {_ADMIN_HINT}")
    results = []
    for address, values in config:
        where = f" on {address}" if server.cluster else ""
        policy, limit = values.get("maxmemory-policy"), values.get("maxmemory", "0")
        cap = "no maxmemory" if limit == "0" else f"maxmemory {limit} bytes"
        if policy == "noeviction":
            results.append(ok(EVICTION, f"noeviction ({cap}){where}: a full Redis refuses "
                                        "writes instead of dropping threads"))
        else:
            results.append(fail(EVICTION, f"maxmemory-policy {policy} ({cap}){where}: Redis may "
                                          "evict a thread's keys (all of them have a TTL) and "
                                          "drop it silently",
                                "CONFIG SET maxmemory-policy noeviction (and in redis.conf)"))
    return _worst(results)


def _functions(server: Server) -> CheckResult:
    import redis

    from edgebundle.sync import lua

    missing = []
    for address, node in server.primaries:
        try:
            node.fcall_ro(lua.function_name("version"), 0)
        except redis.exceptions.NoPermissionError:
            return fail(FUNCTIONS, f"user {server.user} may not run FCALL_RO: it cannot run "
                                   "edgebundle's functions",
                        "provision the device again (edgebundle fleet provision FLEET "
                        "--device ID), or give the user +fcall +fcall_ro")
        except redis.ResponseError as exc:
            if "function not found" not in str(exc).lower():
                return fail(FUNCTIONS, f"{address} cannot run Redis functions: {exc}",
                            "upgrade the Redis to 7.0 or newer")
            missing.append(address)
    others = _other_libraries(server, lua.LIBRARY)
    also = (f"; also loaded: {', '.join(others)} (other edgebundle versions: FUNCTION DELETE "
            "them once no device runs them)") if others else ""
    if not missing:
        where = f" on all {len(server.primaries)} primaries" if server.cluster else ""
        return ok(FUNCTIONS, f"{lua.LIBRARY} (this version's library) is loaded{where}{also}")
    where = f" on {', '.join(missing)}" if server.cluster else ""
    if _may(server, "FUNCTION", "LOAD", "x"):
        return warn(FUNCTIONS, f"{lua.LIBRARY} is not loaded{where}; user {server.user} may load "
                               f"it, so the first sync call does{also}",
                    "nothing to do, or load it now: edgebundle fleet load-functions")
    return fail(FUNCTIONS, f"{lua.LIBRARY} is not loaded{where} and user {server.user} may not "
                           f"load it: every sync call fails{also}",
                "an admin runs: edgebundle fleet load-functions --redis-url ADMIN_URL")


def _other_libraries(server: Server, mine: str) -> list[str]:
    """Other edgebundle libraries (FUNCTION LIST needs an admin: none seen otherwise)."""
    import redis

    try:
        listing = server.client.function_list(library="edgebundle_*")
    except redis.ResponseError:
        return []
    names = {str(dict(zip(lib[::2], lib[1::2], strict=True))["library_name"])
             for lib in listing}
    return sorted(names - {mine})


def _may(server: Server, *command: str) -> bool:
    """Whether this user may run ``command`` (ACL DRYRUN; False when it may not even ask)."""
    import redis

    try:
        return str(_command(server.client, "ACL", "DRYRUN", server.user,
                                                 *command)) == "OK"
    except redis.ResponseError:
        return False


@dataclass(frozen=True)
class Probe:
    what: str  # for people: "FCALL_RO", "GET its desired state" …
    command: tuple[str | int, ...]


def _permissions(server: Server, settings: Settings) -> CheckResult:
    from edgebundle import keys as fleet_keys
    from edgebundle import keys as sync_keys
    from edgebundle.sync import lua

    probe_id = f"doctor-{secrets.token_hex(6)}"  # names no real thread, device or member
    device = server.user.removeprefix("dev:") if server.user.startswith("dev:") else (
        settings.device_id)
    needed = [Probe("FCALL_RO (the library's functions)",
                    ("FCALL_RO", lua.function_name("version"), 0)),
              Probe("HMGET on a thread's keys (watch)", ("HMGET", sync_keys.meta(probe_id), "v")),
              Probe("XRANGE on a run's events", ("XRANGE", sync_keys.run_events(
                  probe_id, "r1"), "-", "+", "COUNT", 1))]
    thread_writes = Probe("writes on a thread's keys", ("PEXPIRE", sync_keys.meta(probe_id), 1))
    extra = [Probe("EVAL", ("EVAL", "return 1", 0)),
             Probe("FUNCTION LOAD", ("FUNCTION", "LOAD", "#!lua name=doctor_probe\n")),
             Probe("CONFIG", ("CONFIG", "GET", "maxmemory")),
             Probe("SCAN", ("SCAN", 0, "COUNT", 1)),
             Probe("PUBLISH", ("PUBLISH", f"{probe_id}-channel", "")),
             Probe("writes on another device's keys",
                   ("PEXPIRE", fleet_keys.desired(probe_id), 1))]
    if device:
        needed += [Probe("GET its desired state", ("GET", fleet_keys.desired(device))),
                   Probe("writes on its own keys",
                         ("PEXPIRE", f"{fleet_keys.device_prefix(device)}{probe_id}", 1))]
    if settings.fleet:
        needed += [Probe("HLEN the fleet's revisions", ("HLEN", fleet_keys.revisions(
                       settings.fleet)))]
        extra += [Probe("writes on the fleet's device set",
                        ("SREM", fleet_keys.fleet_devices(settings.fleet), probe_id))]
    refused = [probe.what for probe in needed if not _runs(server.client, probe)]
    allowed = [probe.what for probe in extra if _runs(server.client, probe)]
    direct = _runs(server.client, thread_writes)  # else proxied: the proxy runs the functions
    if refused == [needed[0].what] and not direct:
        return fail(PERMISSIONS, f"user {server.user} is provisioned for the sync proxy "
                                 "(--access proxied) but connects to Redis directly, where "
                                 "it may not run the sync functions",
                    "use the credentials' redis_url, which names the proxy (edgebundle fleet "
                    "proxy), or provision the device again with --access direct")
    if refused:
        return fail(PERMISSIONS, f"user {server.user} may not run what the sync core and the "
                                 f"agent need: {', '.join(refused)}",
                    "provision the device again with this version (edgebundle fleet provision "
                    "FLEET --device ID) and use the credentials it writes")
    if allowed:
        return warn(PERMISSIONS, f"user {server.user} can do what the sync core and the agent "
                                 f"need, and more: {', '.join(allowed)}; one stolen credential "
                                 "of a device could block or wipe this Redis",
                    "give every device its own user: edgebundle fleet provision FLEET "
                    "--device ID (fine as it is for a private Redis)")
    access = ("thread keys are read-only for it (the sync proxy runs the functions)"
              if not direct else
              "it may also write every thread's keys directly (provision with --access "
              "proxied behind edgebundle fleet proxy so that a stolen credential cannot)")
    return ok(PERMISSIONS, f"user {server.user} can do what the sync core and the agent need, "
                           f"and {', '.join(probe.what for probe in extra)} are refused; "
                           f"{access}")


def _runs(client: redis.Redis, probe: Probe) -> bool:
    """Whether the server let the user run ``probe`` (any answer but NOPERM counts)."""
    import redis

    try:
        _command(client, *probe.command)
    except redis.exceptions.NoPermissionError:
        return False
    except redis.ResponseError as exc:
        # refused inside a function, or a FUNCTION LOAD refused for its (empty) content
        return "no permissions" not in str(exc).lower()
    return True
