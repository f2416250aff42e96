"""Drive the real edgechat guest: ``python -m edgebundle exec … wasm/edgechat.wasm``.

No doubles here: the committed guest runs on the embedded runtime in a child
process with inherited stdio, exactly as a supervisor starts it, and talks the
protocol of edgebundle.guest_protocol over real pipes.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edgebundle.guest_protocol import (
    Delta,
    End,
    Event,
    Fatal,
    Foreign,
    GuestOutputParser,
    Ready,
    encode_request,
)

REPO = Path(__file__).resolve().parents[2]
EDGECHAT = REPO / "wasm" / "edgechat.wasm"
FRAME = "t35tfram3"  # the protocol frame the tests' guests get (run picks a random one)


def build_probe(directory: Path) -> Path:
    """tests/guests/exec_probe.c built for wasm32-wasi (prints its argv/env, exits,
    copies files, echoes stdin or traps, as asked)."""
    out = directory / "probe.wasm"
    subprocess.run(["clang", "--target=wasm32-wasi", "-O2", "-Wl,--strip-all", "-o", str(out),
                    str(REPO / "tests" / "guests" / "exec_probe.c")], check=True, timeout=120)
    return out


def llama3_prompt(user: str, system: str | None = None) -> bytes:
    """A llama-3-chat prompt (ends with the assistant header and "\\n\\n")."""
    parts = ["<|begin_of_text|>"]
    if system is not None:
        parts.append(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
    parts.append(f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>")
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts).encode()


def exec_argv(model: Path | str, *guest_args: str, alias: str = "default",
              app: Path = EDGECHAT, frame: str = FRAME) -> list[str]:
    """As ``run`` starts the chat guest: no ``--dir`` (it gets no directory at all), its
    protocol frame in its environment."""
    env = ["--env", f"EDGECHAT_FRAME={frame}"] if frame else []
    return [sys.executable, "-m", "edgebundle", "exec", *env,
            "--nn-preload", f"{alias}:GGML:AUTO:{model}", str(app), *guest_args]


class GuestProcess:
    """A running guest; every read has a deadline so a hang fails the test."""

    def __init__(self, argv: Sequence[str], stderr_path: Path, timeout: float = 60.0,
                 frame: str = FRAME) -> None:
        self.timeout = timeout
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, cwd=REPO)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._fd = self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self.parser = GuestOutputParser(frame)
        self._backlog: list[Event] = []
        self.foreign: list[str] = []  # the runtime's own lines on stdout (its log)

    def next_event(self) -> Event | None:
        """The next event, or None at end of output."""
        deadline = time.monotonic() + self.timeout
        while not self._backlog:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise TimeoutError(f"guest said nothing for {self.timeout} s; stderr: "
                                   f"{self.stderr()!r}")
            data = os.read(self._fd, 65536)
            if not data:
                return None
            for event in self.parser.feed(data):
                if isinstance(event, Foreign):
                    self.foreign.append(event.text.decode("utf-8", "replace"))
                else:
                    self._backlog.append(event)
        return self._backlog.pop(0)

    def start(self) -> Ready | Fatal:
        event = self.next_event()
        assert isinstance(event, Ready | Fatal), (event, self.stderr())
        return event

    def request(self, prompt: bytes, metadata: bytes = b"",
                max_tokens: int = 0) -> tuple[list[bytes], End]:
        self.send(encode_request(prompt, metadata, max_tokens))
        return self.collect()

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def collect(self) -> tuple[list[bytes], End]:
        pieces: list[bytes] = []
        while True:
            event = self.next_event()
            if isinstance(event, Delta):
                pieces.append(event.data)
            elif isinstance(event, End):
                return pieces, event
            else:
                raise AssertionError(f"unexpected {event!r}; stderr: {self.stderr()!r}")

    def close(self) -> int:
        """Close stdin (EOF ends the guest) and return its exit code."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            return self.proc.wait(self.timeout)
        finally:
            self._selector.close()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")
