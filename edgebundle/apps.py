"""The wasm apps ``run`` can start, and how each one is invoked and probed.

The default app is edgebundle's own chat guest, ``edgechat.wasm`` (wasm/edgechat/):
its tail is ``--model-alias NAME --config JSON`` (the GGML load options), and it
speaks the stdin/stdout protocol of :mod:`edgebundle.guest_protocol`, so it has no
network side; ``run`` puts the HTTP gateway in front of it. The LlamaEdge apps
below are still supported on WasmEdge.

An app runs as ``wasmedge [--dir .:.] --nn-preload <alias>:GGML:AUTO:<model> <app.wasm>
<tail>`` (edgechat without ``--dir``, the LlamaEdge apps with their own data
directory as ``.``: see :mod:`edgebundle.runtime.launch`); this module owns the tail
and the readiness probe for each app kind (:data:`edgebundle.pins.APP_KINDS`).

The flags are LlamaEdge's own (LlamaEdge/LlamaEdge: llama-api-server/src/main.rs and
llama-chat/src/main.rs, clap ``Cli`` structs; llama-api-server/README.md "CLI options";
the same long names from 0.14 through the pinned 0.22.1):

- both apps: ``--prompt-template`` (-p, required), ``--ctx-size`` (-c; llama-chat
  defaults to 512), ``--model-name`` (-m), ``--model-alias`` (-a, default
  ``default``; llama-api-server's default is ``default,embedding``, the first one is
  the chat model's);
- llama-api-server: ``--socket-addr HOST:PORT`` xor ``--port`` (default 8080), routes
  /v1/models, /v1/chat/completions (no /health);
- llama-chat: ``--system-prompt`` (-s); interactive on stdin.

The alias is passed explicitly and is the same string as the ``--nn-preload`` name,
because the app looks its graph up by that name (``load_by_name``): a mismatch only
shows up at the first request.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgebundle.errors import UsageError
from edgebundle.pins import APP_KINDS

DEFAULT_MODEL_ALIAS = "default"

# How long llama-chat (which has no network side to probe) must stay up to count as ready.
SETTLE_SECONDS = 1.0

ReadyProbe = Callable[[], bool]


@dataclass(frozen=True)
class AppOptions:
    """What an app is told on its command line."""

    template: str
    ctx_size: int
    model_name: str
    host: str
    port: int
    model_alias: str = DEFAULT_MODEL_ALIAS
    system_prompt: str | None = None
    threads: int = 0  # llama.cpp threads (edgechat's load config); 0 = not sent
    flash_attn: str = ""  # llama.cpp flash attention (edgechat's load config); "" = not sent


def app_kind(app: Path, explicit: str | None = None) -> str:
    """The kind of ``app``: ``explicit`` if given, else guessed from the file name."""
    if explicit is not None:
        if explicit not in APP_KINDS:
            raise UsageError(
                f"unknown app kind {explicit!r}: use one of {', '.join(APP_KINDS)} "
                "(--app-kind / EDGEBUNDLE_APP_KIND)"
            )
        kind = explicit
    else:
        guessed = next((k for k in APP_KINDS if app.name.startswith(k)), None)
        if guessed is None or app.suffix != ".wasm":
            raise UsageError(
                f"cannot tell which app {app.name} is: name it llama-api-server*.wasm or "
                "llama-chat*.wasm, or pass --app-kind llama-api-server|llama-chat"
            )
        kind = guessed
    return kind


def app_args(kind: str, options: AppOptions) -> list[str]:
    """The arguments after ``<app.wasm>`` for an app of ``kind``."""
    if kind == "edgechat":
        # Prompt template and system prompt live in the orchestrator, not the guest.
        return [
            "--model-alias", options.model_alias,
            "--config", json.dumps(load_config(options.ctx_size, options.threads,
                                               options.flash_attn), separators=(",", ":")),
        ]  # fmt: skip
    common = [
        "--prompt-template", options.template,
        "--ctx-size", str(options.ctx_size),
        "--model-name", options.model_name,
        "--model-alias", options.model_alias,
    ]  # fmt: skip
    if kind == "llama-api-server":
        # No --system-prompt here: the server takes it per request (the gateway adds it).
        return [*common, "--socket-addr", socket_addr(options.host, options.port)]
    if kind == "llama-chat":
        extra = ["--system-prompt", options.system_prompt] if options.system_prompt else []
        return [*common, *extra]
    raise UsageError(f"no launch recipe for app kind {kind!r}")


def load_config(ctx_size: int, threads: int = 0, flash_attn: str = "") -> dict[str, int | str]:
    """The GGML plugin options edgechat loads its model with (load_by_name_with_config).

    ctx-size must be given at load: the plugin builds the llama context then, and a
    later metadata ctx-size does not rebuild it. threads too, and always: without it
    genuine WasmEdge's plugin runs llama.cpp's default of 4 threads, which on a 2-core
    device is hundreds of times slower (the plugin sets batch threads from the same
    value at load; threads-batch is sent for the metadata path). flash-attn is taken at
    load only as well (the ``flash_attn`` setting says why it is off by default).
    """
    config: dict[str, int | str] = {"ctx-size": ctx_size}
    if threads > 0:
        config |= {"threads": threads, "threads-batch": threads}
    if flash_attn:
        config["flash-attn"] = flash_attn
    return config


def socket_addr(host: str, port: int) -> str:
    """``host:port`` as Rust's SocketAddr parses it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def readiness_probe(kind: str, host: str, port: int) -> ReadyProbe | None:
    """How to tell the app is serving; None = ready once it stayed up SETTLE_SECONDS."""
    if kind == "llama-api-server":
        return lambda: tcp_accepts(host, port)
    return None


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds (a wildcard bind is probed locally)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=timeout):
            return True
    except OSError:
        return False
