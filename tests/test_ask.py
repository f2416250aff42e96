"""`edgebundle ask` as a user runs it: a real `edgebundle` subprocess, a real guest.

The guest runs on the embedded runtime with the built-in demo model (generated on
first use) or scripted models generated here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgebundle.demo_model import DEMO_REPLY, ScriptedModelSpec, write_scripted_model

REPLY = "Paris is the capital."


def ask(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEBUNDLE_")}
    env["EDGEBUNDLE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "edgebundle", "ask", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_ask_hello_answers_with_the_demo_model(tmp_path: Path) -> None:
    out = ask(tmp_path, "--runtime", "embedded", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == DEMO_REPLY + "\n"
    assert out.stderr.splitlines() == [
        "edgebundle: no model configured: using the built-in demo model (it only says one "
        "sentence); pass --model FILE.gguf",
        "edgebundle: runtime embedded (chosen with --runtime)",
    ]


def test_ask_json_has_the_api_shape(tmp_path: Path) -> None:
    model = write_scripted_model(tmp_path / "capital.gguf", ScriptedModelSpec(reply=REPLY))
    out = ask(tmp_path, "--runtime", "embedded", "--model", str(model), "--json",
              "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"] == REPLY and data["reason"] == "eos"
    assert set(data) == {"text", "reason", "usage"}
    assert set(data["usage"]) == {"input_tokens", "output_tokens"}
    assert data["usage"]["input_tokens"] > 10 and data["usage"]["output_tokens"] > 3


def test_a_stop_string_ends_the_turn_as_eos(tmp_path: Path) -> None:
    """<|eot_id|> spelled as ordinary text: only the template's stop strings end the turn."""
    model = write_scripted_model(tmp_path / "talk.gguf", ScriptedModelSpec(
        reply=REPLY, eot_is_special=False, after_end="User: and Berlin?"))  # fmt: skip
    out = ask(tmp_path, "--runtime", "embedded", "--model", str(model), "--json", "Capital?")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == REPLY
    assert json.loads(out.stdout)["reason"] == "eos"


def test_max_tokens_gives_length(tmp_path: Path) -> None:
    model = write_scripted_model(tmp_path / "capital.gguf", ScriptedModelSpec(reply=REPLY))
    out = ask(tmp_path, "--runtime", "embedded", "--model", str(model), "--max-tokens", "2",
              "--json", "Capital?")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == "Paris is"
    assert json.loads(out.stdout)["reason"] == "length"


def test_a_prompt_too_long_is_one_line_and_exit_1(tmp_path: Path) -> None:
    model = write_scripted_model(tmp_path / "small.gguf", ScriptedModelSpec(
        reply=REPLY, context_length=64))  # fmt: skip
    out = ask(tmp_path, "--runtime", "embedded", "--model", str(model), "word " * 100)
    assert out.returncode == 1
    assert out.stdout.strip() == ""
    last = out.stderr.splitlines()[-1]
    assert last.startswith("edgebundle: error: the prompt is ")
    assert "too long for the context of 64 tokens" in last
    assert "Traceback" not in out.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    out = ask(tmp_path, "--runtime", "embedded", "   ")
    assert out.returncode == 2 and "the prompt is empty" in out.stderr
    out = ask(tmp_path, "--model", str(tmp_path / "none.gguf"), "hi")
    assert out.returncode == 2
    assert out.stderr == f"edgebundle: error: model file not found: {tmp_path / 'none.gguf'} " \
                         "(from --model / EDGEBUNDLE_MODEL)\n"
    out = ask(tmp_path, "--runtime", "embedded", "--template", "nope", "hi")
    assert out.returncode == 2 and "unknown prompt template 'nope'" in out.stderr
