"""DC-09 frames against pysiaalarm's own parser and responder (a DC-09 implementation we did not write)."""

from __future__ import annotations

import time

import pytest
from crc import Calculator
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.centre.dc09 import (
    CRC16_ARC,
    FrameError,
    FrameReader,
    Route,
    build_message,
    contact_id,
    crc16,
    frame,
    parse_reply,
    sia_dcs,
)

pysiaalarm = pytest.importorskip("pysiaalarm", reason="pip install pysiaalarm (the test extra)")
from pysiaalarm import SIAAccount  # noqa: E402
from pysiaalarm.event import NAKEvent, SIAEvent  # noqa: E402

ROUTE = Route("1", "2", "1234")
#: pysiaalarm takes a key as text and uses its ASCII bytes as the AES key.
KEYS = {None: None, "aes128": "0123456789ABCDEF", "aes256": "0123456789ABCDEF0123456789ABCDEF"}


def parsed_by_pysiaalarm(message: bytes, key_text: str | None) -> SIAEvent:
    return SIAEvent.from_line(message.decode("ascii").strip(), {"1234": SIAAccount("1234", key_text)})


def test_crc_is_crc16_arc_as_pysiaalarm_computes_it():
    assert crc16(b"123456789") == 0xBB3D  # the CRC-16/ARC check value
    reference = Calculator(CRC16_ARC)
    for data in (b"", b"\x00", bytes(range(256)), b'"NULL"0001R0L0#1234[]'):
        assert crc16(data) == reference.checksum(data)
    body = '"SIA-DCS"0001R1L1#1234[#1234|Nri1/PA001]'
    assert f"{crc16(body.encode()):04X}" == SIAEvent._crc_calc(body)


@pytest.mark.parametrize("key_name", list(KEYS))
@pytest.mark.parametrize(
    ("message_type", "data", "code"),
    [
        ("ADM-CID", contact_id(1, 120, 1, 5), "PA"),
        ("ADM-CID", contact_id(1, 121, 1, 5), "HA"),
        ("ADM-CID", contact_id(1, 137, 1, 5), "TA"),
        ("ADM-CID", contact_id(1, 601, 1, 5), "RX"),
        ("ADM-CID", contact_id(1, 350, 1, 5), "YC"),
        ("ADM-CID", contact_id(3, 350, 1, 5), "YK"),
        ("SIA-DCS", sia_dcs("PA", 1, 5), "PA"),
        ("NULL", "", "RP"),
    ],
)
def test_pysiaalarm_reads_and_acks_our_messages(key_name, message_type, data, code):
    key_text = KEYS[key_name]
    key = key_text.encode() if key_text else None
    message = build_message(message_type, 42, ROUTE, data, time.time(), key)
    event = parsed_by_pysiaalarm(message, key_text)
    assert (event.valid_message, event.code, event.sequence, event.account) == (True, code, "0042", "1234")
    assert event.valid_timestamp and abs(event.timestamp.timestamp() - time.time()) < 5
    reply = parse_reply(event.create_response().strip(b"\n\r"), key)
    assert (reply.kind, reply.seq, reply.account, reply.encrypted) == ("ACK", 42, "1234", key is not None)


def test_a_stale_message_is_naked_with_the_arcs_clock():
    message = build_message("ADM-CID", 7, ROUTE, contact_id(1, 120, 1, 1), time.time() - 300)
    event = parsed_by_pysiaalarm(message, None)
    reply = parse_reply(event.create_response().strip(b"\n\r"))
    assert reply.kind == "NAK" and abs(reply.timestamp - time.time()) < 5


def test_pysiaalarms_own_nak_and_duh_parse():
    nak = parse_reply(NAKEvent().create_response().strip(b"\n\r"))  # "NAK"0000L0R0A0[]_time: L before R
    assert (nak.kind, nak.seq) == ("NAK", 0)
    duh = parse_reply(frame('"DUH"0042R1L2#1234[]').strip(b"\n\r"))  # frame() adds LF and CR
    assert (duh.kind, duh.seq, duh.account) == ("DUH", 42, "1234")


def test_a_reply_we_cannot_decrypt_is_a_frame_error_not_an_ack():
    message = build_message("ADM-CID", 9, ROUTE, contact_id(1, 120, 1, 1), time.time(), b"0123456789ABCDEF")
    ack = parsed_by_pysiaalarm(message, "0123456789ABCDEF").create_response().strip(b"\n\r")
    with pytest.raises(FrameError, match="wrong key"):
        parse_reply(ack, b"FEDCBA9876543210")
    with pytest.raises(FrameError, match="no key"):
        parse_reply(ack, None)


def test_a_corrupted_reply_is_refused_by_crc_and_length():
    good = frame('"ACK"0042R1L2#1234[]').strip(b"\n\r")
    with pytest.raises(FrameError, match="bad_crc"):
        parse_reply(good.replace(b"0042", b"0043"))
    with pytest.raises(FrameError, match="bad_length"):
        parse_reply(good + b" ")


def test_the_reader_cuts_frames_out_of_noise_and_chunks():
    reader = FrameReader()
    stream = b"noise\n\nA" + frame('"ACK"0001R1L2#1234[]') + b"junk" + frame('"ACK"0002R1L2#1234[]')
    frames = [f for n in range(0, len(stream), 7) for f in reader.feed(stream[n : n + 7])]
    assert [parse_reply(f).seq for f in frames] == [1, 2]
    reader.feed(b"\n" + b"x" * 5000)  # a frame that never ends is dropped, not kept growing
    assert len(reader._buffer) < 2000


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, b"0123456789ABCDEF"]))
def test_hostile_bytes_are_frame_errors_or_replies(data, key):
    try:
        reply = parse_reply(data, key)
    except FrameError as exc:
        assert exc.reason
    else:
        assert reply.kind in ("ACK", "NAK", "DUH", "RSP") and 0 <= reply.seq <= 9999


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["ACK", "NAK", "DUH", "RSP", "*ACK", "*NAK"]),
    st.text(alphabet='0123456789ABCDEFRL#[]_:,-|*"', max_size=60),
    st.sampled_from([None, b"0123456789ABCDEF"]),
)
def test_well_framed_hostile_bodies_never_escape_as_other_errors(kind, rest, key):
    """Right CRC and length, hostile content: the parser must still only answer Reply or FrameError."""
    try:
        parse_reply(frame(f'"{kind}"{rest}').strip(b"\n\r"), key)
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_the_reader_never_raises_or_hoards(chunks):
    reader = FrameReader()
    for chunk in chunks:
        for found in reader.feed(chunk):
            assert b"\r" not in found
    assert len(reader._buffer) <= 1026


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=6), st.sampled_from([None, b"0123456789ABCDEF"]))
def test_a_hostile_arc_gets_an_answer_matched_or_a_path_failure(chunks, key):
    """Whatever a hostile ARC writes back, the link returns a reply to our frame, a NAK, or PathFailed."""
    import socket

    from agent.centre.forwarder import ArcLink, PathFailed

    ours, theirs = socket.socketpair()
    try:
        link = ArcLink("primary", ours)
        theirs.sendall(b"".join(chunks))
        theirs.shutdown(socket.SHUT_WR)  # it has said all it will say
        try:
            reply = link.exchange(b"\n0000", 42, "1234", key, timeout=0.5)
        except PathFailed:
            return
        assert reply.kind == "NAK" or (reply.seq == 42 and reply.account in (None, "1234"))
    finally:
        ours.close()
        theirs.close()


def test_a_hostile_arc_cannot_ack_for_another_account_or_sequence():
    import socket

    from agent.centre.forwarder import ArcLink, PathFailed

    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(frame('"ACK"0042R0L0#9999[]') + frame('"ACK"0041R0L0#1234[]'))
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(PathFailed, match="closed the connection"):
            ArcLink("primary", ours).exchange(b"\n0000", 42, "1234", None, timeout=2)
    finally:
        ours.close()
        theirs.close()
