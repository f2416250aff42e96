"""The terminal chat (``edgebundle chat``): the terminal of a chat session.

Lines are read from stdin, the conversation goes to stdout and notes to stderr; the
prompt shows only on a terminal (piped output stays the conversation).

Ctrl-C during a reply stops it for everyone: printing stops at once and the run is
cancelled with ``content_seen`` = exactly the text printed, which is then what the
thread stores (and what the model sees next). A second Ctrl-C stops waiting for
the cancel to be confirmed. Ctrl-C or Ctrl-D at the prompt ends the chat.

The session (joining, turns, following runs, watching the thread) is
:mod:`edgebundle.chat_session`; what it shows of the thread is
:mod:`edgebundle.chat_transcript`'s; its options are :mod:`edgebundle.chat_options`'s.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import IO

from edgebundle.chat_options import ChatOptions
from edgebundle.chat_session import run_chat


class Console:
    """Where the chat reads lines and writes text: stdout for the conversation, stderr
    for notes. Lines are read by a daemon thread (raw reads of the descriptor, so the
    thread holds no lock of ``sys.stdin`` when the process exits)."""

    def __init__(self, stdin_fd: int = 0, out: IO[str] | None = None,
                 err: IO[str] | None = None) -> None:
        self.stdin_fd = stdin_fd
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.interactive = os.isatty(stdin_fd)
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._at_line_start = True
        self._prompt_shown = False

    def start_reading(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), daemon=True,
                         name="chat-stdin").start()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self.stdin_fd, 4096)
            except OSError:
                chunk = b""
            pending += decoder.decode(chunk, final=not chunk)
            *lines, pending = pending.split("\n")
            if not chunk:
                lines += [pending] if pending else []
            try:
                for line in lines:
                    loop.call_soon_threadsafe(self._lines.put_nowait, line.rstrip("\r"))
                if not chunk:
                    loop.call_soon_threadsafe(self._lines.put_nowait, None)
                    return
            except RuntimeError:  # the chat ended (its loop is closed): nobody reads on
                return

    async def next_line(self) -> str | None:
        """The next typed line, None at end of input (Ctrl-D)."""
        return await self._lines.get()

    def write(self, text: str) -> None:
        if not text:
            return
        if self._prompt_shown:  # something arrived while the prompt waited
            self.out.write("\n")
            self._prompt_shown = False
        self.out.write(text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        if not self._at_line_start:
            self.write("\n")

    def prompt(self) -> None:
        """Show the prompt (on a terminal only: piped output stays the conversation)."""
        if self.interactive and not self._prompt_shown:
            self.end_line()
            self.out.write("> ")
            self.out.flush()
            self._prompt_shown = True

    def typed(self) -> None:
        """The user ended a line: the prompt is no longer on screen."""
        self._prompt_shown = False
        self._at_line_start = True

    def note(self, text: str) -> None:
        if self._prompt_shown:  # a note while waiting: not on the prompt's line
            self.out.write("\n")
            self.out.flush()
            self._prompt_shown = False
        self.err.write(f"edgebundle: {text}\n")
        self.err.flush()


def chat(options: ChatOptions, console: Console | None = None) -> None:
    """The ``edgebundle chat`` session on this terminal; raises EdgebundleError subclasses."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        handlers: list[Callable[[], None]] = []

        def interrupted() -> None:
            if handlers:
                handlers[0]()
            elif main_task is not None:  # before the session exists: give up at once
                main_task.cancel()

        loop.add_signal_handler(signal.SIGINT, interrupted)
        try:
            await run_chat(options, console or Console(), handlers.append)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:  # Ctrl-C while joining
        raise KeyboardInterrupt from None
