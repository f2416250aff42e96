"""`edgebundle chat`: a terminal chat on a gateway's thread, shared with other devices."""

from __future__ import annotations

import click

from edgebundle.chat_options import chat_options
from edgebundle.config import load_settings
from edgebundle.terminal_chat import chat as chat_core


@click.command()
@click.option("--server", metavar="URL",
              help="The gateway (default http://<host>:<port> of the settings, "
                   "http://127.0.0.1:8080).")
@click.option("--thread", "thread_id", metavar="ID",
              help="Join thread ID (created if missing); default: a new thread.")
@click.option("--device-id",
              help="This chat's device id (default: kept in <home>/state/chat-device-id).")
@click.option("--max-tokens", type=click.IntRange(min=1),
              help="Stop each reply after N tokens.")
@click.pass_context
def chat(ctx: click.Context, /, server: str | None, thread_id: str | None,
         device_id: str | None, max_tokens: int | None) -> None:
    """Chat in the terminal; every device on the thread sees the same conversation.

    Ctrl-C stops a reply (the thread keeps exactly the text shown); Ctrl-C or Ctrl-D
    at the prompt ends the chat. The API key comes from EDGEBUNDLE_API_KEY or
    config.toml.
    """
    settings = load_settings({"device_id": device_id, "home": (ctx.obj or {}).get("home")})
    chat_core(chat_options(settings, server=server, thread_id=thread_id,
                           max_tokens=max_tokens))
