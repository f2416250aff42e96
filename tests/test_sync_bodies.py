"""The sync API's request bodies (edgebundle.gateway.sync_bodies): what a bad one is
refused with, word for word, and which of several faults is named first (the order
the API checked them in when it checked by hand). No server: the models alone."""

from __future__ import annotations

from typing import Any

import pytest

from edgebundle.completion import ChatParams
from edgebundle.errors import UsageError
from edgebundle.gateway.sync_bodies import (
    MAX_VERSION,
    Body,
    CancelBody,
    NewThreadBody,
    PushBody,
    RunBody,
    parse,
)
from edgebundle.guest_protocol import MAX_TOKENS

INPUT = 'input must be an object {"content": "…"} with the user\'s message'
HI = {"content": "hi"}


@pytest.mark.parametrize(("model", "body", "message"), [
    (RunBody, {}, INPUT),
    (RunBody, {"input": {"content": 5}}, INPUT),
    (RunBody, {"input": "hi"}, INPUT),
    (RunBody, {"input": {"content": "  "}}, "input.content is empty: send the user's message"),
    (RunBody, {"input": HI, "multitask": "shove"},
     "multitask must be one of enqueue, reject, interrupt, not 'shove'"),
    (RunBody, {"input": HI, "stream": 1}, "stream must be a boolean"),
    (RunBody, {"input": HI, "device_id": None}, "device_id must be a string id"),
    (RunBody, {"input": HI, "epoch": 5},
     "epoch must be a string (the epoch of the client's last sync)"),
    (RunBody, {"input": HI, "since": True}, "since must be an integer"),
    (RunBody, {"input": HI, "since": -1}, f"since must be between 0 and {MAX_VERSION}, got -1"),
    (RunBody, {"input": {"content": "hi", "id": 7}}, "input.id must be a string id"),
    (RunBody, {"input": HI, "params": [1]},
     'params must be an object such as {"max_tokens": 256}'),
    (RunBody, {"input": HI, "params": {"max_tokens": 0}},
     f"params.max_tokens must be an integer between 1 and {MAX_TOKENS}"),
    (RunBody, {"input": HI, "params": {"temperature": True}},
     "params.temperature must be a number between 0 and 2"),
    (RunBody, {"input": HI, "params": {"temperature": float("nan")}},
     "params.temperature must be a number between 0 and 2"),
    # Several faults: the one the API always named first.
    (RunBody, {"input": {"content": "hi", "id": 7}, "since": -1, "params": [1]},
     f"since must be between 0 and {MAX_VERSION}, got -1"),
    (RunBody, {"input": {"content": "hi", "id": 7}, "params": [1]},
     "input.id must be a string id"),
    (PushBody, {"mutations": []},
     "epoch is missing: send the epoch of your last sync (or reseed: true)"),
    (PushBody, {"device_id": "no spaces", "mutations": []},
     "epoch is missing: send the epoch of your last sync (or reseed: true)"),
    (PushBody, {"reseed": "yes", "epoch": 5}, "reseed must be a boolean"),
    (PushBody, {"epoch": "E", "mutations": []}, "device_id must be a string id"),
    (PushBody, {"epoch": "E", "device_id": "d", "mutations": {}},
     "mutations must be a list of {mid, op, message} objects"),
    (CancelBody, {"content_seen": 3, "device_id": 3},
     "content_seen must be a string (the text the user saw)"),
    (NewThreadBody, {"id": "no spaces"}, "id: invalid thread id 'no spaces': use 1-128 letters, "
     "digits, '_', '.', ':' or '-'"),
])
def test_a_bad_body_is_refused_with_the_apis_message(
    model: type[Body], body: dict[str, Any], message: str,
) -> None:
    defaults: dict[str, Any] = {"device_id": "devA"} if model in (RunBody, CancelBody) else {}
    if model is PushBody:
        defaults = {"device_id": None}
    with pytest.raises(UsageError) as refused:
        parse(model, body, **defaults)
    assert str(refused.value) == message


def test_a_good_body_gets_its_defaults_and_keys_it_does_not_know_are_left_alone() -> None:
    run = parse(RunBody, {"input": {"content": "hi", "id": "m-1"}, "extra": 1,
                          "params": {"temperature": 1, "max_tokens": 8}}, device_id="devA")
    assert (run.device_id, run.epoch, run.since, run.multitask, run.stream) == (
        "devA", None, 0, "enqueue", True)
    assert run.input.id == "m-1"
    assert run.params is not None and run.params.chat() == ChatParams(max_tokens=8,
                                                                       temperature=1.0)
    push = parse(PushBody, {"reseed": True, "device_id": "d", "mutations": []}, device_id=None)
    assert (push.reseed, push.epoch, push.since) == (True, None, 0)
    assert parse(NewThreadBody, {}).id is None
