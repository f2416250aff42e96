"""`edgebundle ask PROMPT`: one answer from the chat guest, streamed to stdout."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from edgebundle.config import RUNTIMES, load_settings
from edgebundle.serving import ask as ask_core


def _text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    click.echo(f"edgebundle: {text}", err=True)


@click.command()
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Runtime (default auto).")
@click.option("--model", type=click.Path(dir_okay=False), help="GGUF model file.")
@click.option("--template", help="Prompt template, e.g. llama-3-chat (default: from the model).")
@click.option("--system-prompt", help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Stop after N tokens.")
@click.option("--json", "as_json", is_flag=True, help='Print {"text", "reason", "usage"} as JSON.')
@click.argument("prompt")
@click.pass_context
def ask(
    ctx: click.Context, /, prompt: str, max_tokens: int | None, as_json: bool, **flags: object
) -> None:
    """Answer PROMPT once (the text streams as it is generated)."""
    settings = load_settings({**flags, "home": (ctx.obj or {}).get("home")})
    result = asyncio.run(ask_core(
        settings, prompt, max_tokens=max_tokens, on_text=None if as_json else _text, on_note=_note
    ))  # fmt: skip
    if as_json:
        click.echo(json.dumps({
            "text": result.text,
            "reason": result.reason,
            "usage": {"input_tokens": result.usage.input_tokens,
                      "output_tokens": result.usage.output_tokens},
        }))  # fmt: skip
    else:
        click.echo()
