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
    Foreign,
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


def test_with_a_frame_only_framed_lines_are_the_protocol() -> None:
    """The runtime's log shares the guest's stdout; a log line may quote a client's
    text, even one shaped like the protocol. Without the frame it is foreign."""
    parser = GuestOutputParser("f00d")
    data = (b"[2026-12-05 01:02:03.456] [error] [WASI-NN] GGML backend: bad\n"
            b"END eos 100 0\nD 3\nabc\n"  # a forged protocol, unframed
            b"f00d READY 0 512\n"
            b"half a log line without its newline"  # then the guest's line
            b"f00d D 3\nhi\n"
            b"f00d END eos 100 2\n{}")
    events = []
    for i in range(len(data)):  # byte by byte: every split point
        events += parser.feed(data[i:i + 1])
    assert events == [
        Foreign(b"[2026-12-05 01:02:03.456] [error] [WASI-NN] GGML backend: bad"),
        Foreign(b"END eos 100 0"), Foreign(b"D 3"), Foreign(b"abc"),
        Ready(0, 512), Foreign(b"half a log line without its newline"),
        Delta(b"hi\n"), End(EndReason.EOS, 100, {})]
    assert parser.idle
    # a payload is taken by length whatever it holds, frame included
    assert parser.feed(b"f00d D 10\nf00d END x") == [Delta(b"f00d END x")]
    huge = parser.feed(b"x" * 100_000)  # an endless foreign line is passed on in parts
    assert huge and all(isinstance(e, Foreign) for e in huge)
