"""A scripted chat engine for in-process tests: a double at the Engine boundary.

:class:`ScriptedEngine` implements :class:`edgebundle.engine.ChatEngine`, the boundary
where the real :class:`~edgebundle.engine.Engine` talks to the guest process (a
wasmedge or embedded-runtime child running llama.cpp). Everything above it is real in
the tests that use it: the chat (template rendering, stop strings), the turn core
(:mod:`edgebundle.turns`), the sync core on a real redis-server, the Starlette app.

It is honest about what the real engine promises, and nothing more:

- one request at a time, first come first served (the guest serves one; an asyncio
  lock, as in Engine);
- the text comes in pieces and then exactly one ``End``; ``max_tokens`` 0 means no
  limit, else the request ends ``length`` after that many pieces (one piece = one
  token here), and ``cancel()`` ends the running one ``cancelled``;
- a consumer that stops iterating frees the engine for the next request;
- ``input_tokens`` is a count of the prompt (whitespace-separated words, not the
  model's tokenizer: tests compare these counts with each other, never with a model's).

What it says is the script of the tiny model of the real-process tests
(:func:`tests.support.devices.endless_model`): "Looping forever forever …" until
``max_tokens`` or a cancel stops it, so the same assertions hold in both tiers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from edgebundle.engine import Delta, End

FIRST, AGAIN = "Looping", " forever"


class ScriptedEngine:
    """The scripted double (see the module docstring); ``prompts`` records each request."""

    def __init__(self, piece_delay: float = 0.001) -> None:
        self.piece_delay = piece_delay  # s between pieces: time for queues and cancels
        self.prompts: list[str] = []
        self.metadata: list[Mapping[str, Any]] = []
        self.restarts = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self._lock = asyncio.Lock()
        self._cancelled = False
        self._busy = False

    @property
    def ready(self) -> bool:
        return True

    async def generate(self, prompt: str, metadata: Mapping[str, Any],
                       max_tokens: int) -> AsyncGenerator[Delta | End, None]:
        async with self._lock:  # released when the consumer stops iterating, too
            self.prompts.append(prompt)
            self.metadata.append(metadata)
            self._cancelled, self._busy = False, True
            prompt_tokens = len(prompt.split())
            self.input_tokens += prompt_tokens
            pieces = 0
            try:
                while True:
                    if self._cancelled:
                        yield End("cancelled", prompt_tokens, pieces)
                        return
                    if max_tokens and pieces >= max_tokens:
                        yield End("length", prompt_tokens, pieces)
                        return
                    pieces += 1
                    self.output_tokens += 1
                    yield Delta(FIRST if pieces == 1 else AGAIN)
                    await asyncio.sleep(self.piece_delay)
            finally:
                self._busy = False

    async def cancel(self) -> None:
        if self._busy:
            self._cancelled = True
