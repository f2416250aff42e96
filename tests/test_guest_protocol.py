"""edgebundle.guest_protocol: request encoding and the incremental output parser."""

from __future__ import annotations

import asyncio

import pytest

from edgebundle.errors import GuestProtocolError
from edgebundle.guest_protocol import (
    Delta,
    End,
    EndReason,
    Fatal,
    GuestOutputParser,
    Ready,
    encode_request,
)

INFO = b'{"input_tokens": 5, "output_tokens": 3}'
STREAM = (b"READY 0 0\nD 6\nHello!D 3\n\n\x00\xffD 0\n"
          + f"END eos 100 {len(INFO)}\n".encode() + INFO
          + b"END length 0 0\nEND error 7 3\nnot")
EVENTS = [Ready(0, 0), Delta(b"Hello!"), Delta(b"\n\x00\xff"), Delta(b""),
          End(EndReason.EOS, 100, {"input_tokens": 5, "output_tokens": 3}),
          End(EndReason.LENGTH, 0, {}), End(EndReason.ERROR, 7, {})]


def test_encode_request_is_header_prompt_metadata() -> None:
    assert encode_request(b"a\nb", b'{"x":1}', 5) == b'REQ 3 7 5\na\nb{"x":1}'
    assert encode_request(b"", b"", 0) == b"REQ 0 0 0\n"
    with pytest.raises(ValueError):
        encode_request(b"", b"", -1)


def test_whole_stream_at_once() -> None:
    parser = GuestOutputParser()
    assert parser.feed(STREAM) == EVENTS
    assert parser.idle


@pytest.mark.parametrize("chunk", [1, 2, 5, 13])
def test_any_split_of_the_stream_gives_the_same_events(chunk: int) -> None:
    parser = GuestOutputParser()
    events = []
    for i in range(0, len(STREAM), chunk):
        events += parser.feed(STREAM[i:i + chunk])
        if i + chunk < len(STREAM):
            assert events == EVENTS[:len(events)]
    assert events == EVENTS


def test_fatal_keeps_its_message() -> None:
    assert GuestOutputParser().feed(b"FATAL 8 no preloaded model named x (give --nn-preload)\n") \
        == [Fatal(8, "no preloaded model named x (give --nn-preload)")]


@pytest.mark.parametrize("bad", [b"HELLO\n", b"D x\n", b"D -1\n", b"END maybe 0 0\n", b"READY 1\n",
                                 b"END eos 100\n", b"\xff\xfe\n", b"x" * 2000])
def test_anything_else_is_a_protocol_error(bad: bytes) -> None:
    with pytest.raises(GuestProtocolError, match="protocol|unknown reason"):
        GuestOutputParser().feed(bad)


def test_info_that_is_not_a_json_object_becomes_empty() -> None:
    assert GuestOutputParser().feed(b"END eos 100 3\n[1]") == [End(EndReason.EOS, 100, {})]


def test_usable_from_asyncio_streams() -> None:
    async def main() -> list[object]:
        reader = asyncio.StreamReader()
        reader.feed_data(STREAM)
        reader.feed_eof()
        parser = GuestOutputParser()
        events: list[object] = []
        while data := await reader.read(7):
            events += parser.feed(data)
        return events

    assert asyncio.run(main()) == EVENTS


def test_end_reasons_are_plain_strings() -> None:
    assert str(EndReason.CONTEXT_FULL) == "context_full"
    assert {r.value for r in EndReason} == {"eos", "length", "context_full", "prompt_too_long",
                                            "cancelled", "error"}
