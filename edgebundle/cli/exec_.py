"""`edgebundle exec`: run a wasm32-wasi app on the embedded runtime with wasmedge's flags.

``wasmedge`` in a command line can be swapped for ``edgebundle exec``: the options
before APP are wasmedge's, everything after APP goes to the app untouched, stdio
is the app's and the exit code is the app's. Compiled modules are kept in the home's
``cache/wasm/`` (made only in a home that exists: a bare ``edgebundle exec`` on a
machine without one leaves nothing behind).
"""

from __future__ import annotations

import signal
from pathlib import Path

import click

from edgebundle.errors import RuntimeNotFoundError, UsageError
from edgebundle.layout import Layout, default_home


@click.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--dir", "dirs", multiple=True, metavar="GUEST:HOST",
              help="Preopen HOST as GUEST in the app (a bare PATH maps onto itself).")
@click.option("--env", "envs", multiple=True, metavar="NAME=VALUE",
              help="Set an environment variable for the app (nothing is inherited).")
@click.option("--nn-preload", "preloads", multiple=True, metavar="NAME:GGML:TARGET:PATH",
              help="Preload a GGML model for WASI-NN load_by_name(NAME).")
@click.argument("app", metavar="APP.wasm")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(ctx: click.Context, dirs: tuple[str, ...], envs: tuple[str, ...],
             preloads: tuple[str, ...], app: str, args: tuple[str, ...]) -> None:
    """Run APP.wasm like `wasmedge` does, on the embedded runtime."""
    # Imported here: a device installed with --no-embedded has no wasmtime, and every
    # other command must still work there.
    try:
        from edgebundle.runtime.embedded.host import parse_dir, parse_env, run_app
        from edgebundle.runtime.embedded.preload import parse_preload
    except ImportError as exc:
        raise RuntimeNotFoundError(
            f"the embedded runtime is not installed ({exc.name} is missing): rerun "
            "./install.sh without --no-embedded, or pip install 'edgebundle[embedded]'"
        ) from None
    if app.startswith("-"):
        raise UsageError(f"exec has no option {app} (it takes --dir, --env and --nn-preload "
                         "before APP.wasm; options after APP.wasm go to the app)")
    # Like wasmedge, die at Ctrl-C: Python would only notice it at the next host call,
    # and an idle guest blocked reading stdin makes none.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    home = (ctx.find_root().obj or {}).get("home")
    layout = Layout(Path(home).expanduser() if home else default_home())
    code = run_app(
        Path(app), args,
        dirs=[parse_dir(d) for d in dirs],
        env=dict(parse_env(e) for e in envs),
        preloads=[p for p in map(parse_preload, preloads) if p is not None],
        cache_dir=layout.cache / "wasm" if layout.home.is_dir() else None,
    )
    ctx.exit(code)
