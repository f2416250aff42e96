"""Settings, resolved flag > environment > config file > default.

Environment variables are ``EDGEBUNDLE_<FIELD>`` (``EDGEBUNDLE_REDIS_URL``,
``EDGEBUNDLE_HOME``, ``EDGEBUNDLE_DEVICE_ID``, ``EDGEBUNDLE_API_KEY``, ...). The config
file is ``<home>/config.toml`` with the same field names as top-level keys.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgebundle.context_window import check_policy
from edgebundle.errors import ConfigError
from edgebundle.layout import Layout, default_home

RUNTIMES = ("auto", "wasmedge", "embedded")
FLASH_ATTN = ("off", "on", "auto")  # the GGML plugin's flash-attn values
ENV_PREFIX = "EDGEBUNDLE_"


@dataclass(frozen=True)
class Settings:
    home: Path
    runtime: str = "auto"
    model: Path | None = None
    app: Path | None = None
    template: str | None = None
    system_prompt: str | None = None
    ctx_size: int = 4096
    # llama.cpp threads for generation and prompt batches, always sent to the plugin
    # (genuine WasmEdge's default is 4 whatever the CPUs); 0 = the CPUs this process
    # may use (host.usable_cpus: affinity and the cgroup's CPU quota).
    threads: int = 0
    # llama.cpp's flash attention (auto | on | off), always sent to the plugin. Off by
    # default: on CPUs its kernels evaluate prompts slower (bench/peer.py: a 95-token
    # message on 2,400 tokens of history took 2x as long with it), and the prompt is
    # what a device with a long thread waits for. On helps GPU builds.
    flash_attn: str = "off"
    redis_url: str | None = None
    device_id: str | None = None
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    wasmedge: Path | None = None  # explicit wasmedge binary; else <home>/runtime/current, PATH
    app_kind: str | None = None  # pins.APP_KINDS; None = guess from the app's file name
    fleet: str | None = None  # the fleet this device belongs to (edgebundle agent)
    # A thread longer than the context: "window" leaves out its oldest messages,
    # "fail" fails the run (edgebundle.context_window).
    context_policy: str = "window"
    offline_after: int = 10  # s without the central Redis before a device serves offline
    # What the gateway answers (edgebundle.gateway.guard): extra Host names besides
    # localhost, 127.0.0.1, [::1] and the bound address, and web origins besides its own
    # that may POST; both comma-separated.
    allowed_hosts: str | None = None
    allowed_origins: str | None = None
    # Caps (edgebundle.limits): a request body, a message's content (UTF-8
    # bytes), the messages of a thread (tombstones too), open streams of readers, turns
    # this device has going (waiting or generating), runs waiting in line on a thread.
    max_body_bytes: int = 1024 * 1024
    max_message_bytes: int = 64 * 1024
    max_thread_messages: int = 1000
    max_streams: int = 64
    max_runs: int = 32
    max_queued_runs: int = 24

    @property
    def layout(self) -> Layout:
        return Layout(self.home)

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able values, secrets masked (for logs and --debug)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key" and value:
                value = "***"
            elif f.name == "redis_url" and value:
                value = redact_url(value)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


_ANNOTATIONS = {f.name: str(f.type) for f in fields(Settings)}


def redact_url(url: str) -> str:
    """The URL with any password replaced, so it can be printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()


def local_gateway_url(settings: Settings) -> str:
    """The gateway of this device as a client on it reaches it: ``http://<host>:<port>``
    from the settings, over the loopback when it listens on every address."""
    host = settings.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{settings.port}"


def validate_redis_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"bad Redis URL {redact_url(url)!r}: use redis://[user:password@]host:port[/db], "
            "rediss:// for TLS, or unix:///path/to/socket"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: the port is not a number") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: no host")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: port out of range")
    return url


def _coerce(name: str, value: Any, source: str) -> Any:
    if value is None or value == "":
        return None
    annotation = _ANNOTATIONS[name]  # a string: this module uses postponed annotations
    if annotation.startswith("Path"):
        return Path(str(value)).expanduser()
    if annotation == "int":
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if isinstance(value, bool) or number <= 0:
            raise ConfigError(f"{source}: {name} must be a positive whole number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
    return value


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    known = {f.name for f in fields(Settings)} - {"home"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return data


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolve every setting from flags (None = not given), environment, config file."""
    env = os.environ if environ is None else environ
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    home = Path(given["home"]).expanduser() if "home" in given else default_home(dict(env))
    settings = Settings(home=home)
    file_values = _read_config_file(Layout(home).config_file)
    updates: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each given value came from, for errors
    for f in fields(Settings):
        if f.name == "home":
            continue
        env_name = ENV_PREFIX + f.name.upper()
        if f.name in given:
            source, raw = f"--{f.name.replace('_', '-')}", given[f.name]
        elif env.get(env_name):
            source, raw = env_name, env[env_name]
        elif f.name in file_values:
            source, raw = str(Layout(home).config_file), file_values[f.name]
        else:
            continue
        value = _coerce(f.name, raw, source)
        if value is not None:
            updates[f.name] = value
            sources[f.name] = source
    settings = replace(settings, **updates)
    if settings.runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {settings.runtime!r}")
    check_policy(settings.context_policy, sources.get("context_policy", ""))
    if settings.flash_attn not in FLASH_ATTN:
        where = sources.get("flash_attn", "flash_attn")
        raise ConfigError(f"{where}: flash_attn must be one of {', '.join(FLASH_ATTN)}, "
                          f"got {settings.flash_attn!r}")
    if settings.redis_url:
        validate_redis_url(settings.redis_url)
    return settings
