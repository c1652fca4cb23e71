"""SIA DC-09 framing: what the centre sends an alarm receiving centre (ARC) and how it reads the answers.

A DC-09 message is ``<LF><crc><0LLL><"id">seq[Rrcvr]Lpref#acct[data]_timestamp<CR>``: a CRC-16/ARC
(polynomial 0x8005, reflected, as DC-09 specifies) of everything from the first quote to the end, the
length of that part in four hex digits, the message type (``ADM-CID`` carries Contact ID, SIA DC-05;
``SIA-DCS`` carries SIA DC-03 codes; ``NULL`` is a supervision message), a sequence number 0001-9999,
receiver and line numbers, the account, the data and a UTC timestamp. With a key, everything after
``[`` is AES-CBC encrypted (zero IV) behind random padding that never contains ``|``, ``[`` or ``]``,
and the type is marked with ``*``.

The ARC answers ``ACK`` (it has the event), ``NAK`` (refused: bad timestamp, CRC, account or key;
it carries the ARC's clock), ``DUH`` (understood the frame, not the event) or ``RSP``. Every reply is
hostile input: ``parse_reply`` returns a ``Reply`` or raises ``FrameError`` with a reason, nothing else.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime

from crc import Calculator, Configuration
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.errors import AgentError

#: CRC-16/ARC: poly 0x8005, init 0, reflected in and out, no final xor (check value 0xBB3D).
CRC16_ARC = Configuration(
    width=16, polynomial=0x8005, init_value=0, final_xor_value=0, reverse_input=True, reverse_output=True
)
#: The same CRC computed unreflected over bit-reversed bytes, then reversed: the same value, 4x faster
#: with the ``crc`` package (which reflects byte by byte in Python; ``bytes.translate`` does it in C).
_CRC_UNREFLECTED = Calculator(
    Configuration(width=16, polynomial=0x8005, init_value=0, final_xor_value=0, reverse_input=False), optimized=True
)
_BIT_REVERSED = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))
#: Longer replies than this are not DC-09 answers: the reader drops them.
MAX_FRAME_BYTES = 1024
KEY_SIZES = (16, 24, 32)
MESSAGE_TYPES = ("ADM-CID", "SIA-DCS", "NULL")
REPLY_KINDS = ("ACK", "NAK", "DUH", "RSP")
#: Padding characters: printable, but never the separators DC-09 reserves.
_PAD_ALPHABET = "".join(c for c in string.ascii_letters + string.digits + "!#$%&()*+,-./:;<=>?@^_{}~" if c not in "|[]")
_IV = bytes(16)  # DC-09: the IV is zero; the random padding in front makes each ciphertext differ
_TIMESTAMP = re.compile(r"_(\d{2}):(\d{2}):(\d{2}),(\d{2})-(\d{2})-(\d{4})$")
_REPLY = re.compile(
    r'"(?P<star>\*?)(?P<kind>ACK|NAK|DUH|RSP)"(?P<seq>\d{4})'
    r"(?:R(?P<r1>[0-9A-F]{1,6}))?(?:L(?P<line>[0-9A-F]{1,6}))?(?:R(?P<r2>[0-9A-F]{1,6}))?"
    r"(?:#(?P<account>[0-9A-F]{3,16})|A0)?\[(?P<rest>[\x20-\x7e]*)",
    re.ASCII,
)


class FrameError(AgentError, ValueError):
    """A reply that is not a well-formed DC-09 answer (or cannot be decrypted with our key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Route:
    """Where a message is addressed: receiver number, line number (hex, 1-6 digits) and account."""

    receiver: str
    line: str
    account: str


@dataclass(frozen=True)
class Reply:
    kind: str  # ACK / NAK / DUH / RSP
    seq: int
    account: str | None
    timestamp: float | None  # the ARC's clock (UTC), when the reply carries one
    encrypted: bool


def crc16(data: bytes) -> int:
    """CRC-16/ARC of ``data`` (as DC-09 specifies)."""
    return int(f"{_CRC_UNREFLECTED.checksum(data.translate(_BIT_REVERSED)):016b}"[::-1], 2)


def dc09_timestamp(at: float) -> str:
    """``_HH:MM:SS,MM-DD-YYYY`` in UTC, as DC-09 appends it to every message."""
    return datetime.fromtimestamp(at, UTC).strftime("_%H:%M:%S,%m-%d-%Y")


def parse_timestamp(text: str) -> float | None:
    """The Unix time of a trailing DC-09 timestamp, or None if there is none (or it is impossible)."""
    match = _TIMESTAMP.search(text)
    if match is None:
        return None
    hour, minute, second, month, day, year = (int(g) for g in match.groups())
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()
    except ValueError:
        return None


def contact_id(qualifier: int, code: int, partition: int, zone: int) -> str:
    """Contact ID (DC-05) event data: ``Q EEE GG ZZZ`` as DC-09 carries it, e.g. ``1120 01 001``."""
    return f"{qualifier}{code:03d} {partition:02d} {zone:03d}"


def sia_dcs(code: str, partition: int, zone: int) -> str:
    """SIA DC-03 event data: new event, area, two-letter code and zone, e.g. ``Nri1/PA001``."""
    return f"Nri{partition}/{code}{zone:03d}"


def build_message(message_type: str, seq: int, route: Route, data: str, at: float, key: bytes | None = None) -> bytes:
    """One complete DC-09 frame (LF … CR); ``data`` is the event after ``[#acct|`` (empty for NULL)."""
    if message_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown DC-09 message type {message_type!r}")
    block = (f"#{route.account}|{data}" if data else "") + "]" + dc09_timestamp(at)
    head = f'"{"*" if key else ""}{message_type}"{seq:04d}R{route.receiver}L{route.line}#{route.account}['
    body = head + (encrypt(block, key) if key else block)
    return frame(body)


def frame(body: str) -> bytes:
    """CRC, length and the LF/CR around a message body (from its first quote on)."""
    raw = body.encode("ascii")
    return b"\n" + f"{crc16(raw):04X}{len(raw):04X}".encode() + raw + b"\r"


def encrypt(block: str, key: bytes) -> str:
    """Random padding, ``|``, the block; AES-CBC with a zero IV; upper-case hex (DC-09's encrypted form)."""
    pad_size = -(len(block) + 1) % 16
    plain = ("".join(secrets.choice(_PAD_ALPHABET) for _ in range(pad_size)) + "|" + block).encode("ascii")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(_IV)).encryptor()
    return (encryptor.update(plain) + encryptor.finalize()).hex().upper()


def decrypt(hex_text: str, key: bytes) -> str:
    """The plain block behind an encrypted reply, or FrameError (not hex, not whole blocks, not text)."""
    if not hex_text or len(hex_text) % 32 or not all(c in string.hexdigits for c in hex_text):
        raise FrameError("bad_ciphertext", f"{len(hex_text)} characters, not whole AES blocks of hex")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(_IV)).decryptor()
    plain = decryptor.update(bytes.fromhex(hex_text)) + decryptor.finalize()
    try:
        text = plain.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("undecryptable", "the reply does not decrypt with our key (wrong key?)") from None
    if "]" not in text or not text.isprintable():
        raise FrameError("undecryptable", "the reply does not decrypt with our key (wrong key?)")
    return text


def parse_reply(raw: bytes, key: bytes | None = None) -> Reply:
    """One reply frame, without its LF and CR: checked (length, CRC, form), decrypted, read; else FrameError."""
    if len(raw) > MAX_FRAME_BYTES:
        raise FrameError("oversized", f"{len(raw)} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("not_ascii") from None
    if len(text) < 9 or not all(c in string.hexdigits for c in text[:8]):
        raise FrameError("malformed", f"no CRC and length in {text[:20]!r}")
    body = text[8:]
    if int(text[4:8], 16) != len(body):
        raise FrameError("bad_length", f"says {int(text[4:8], 16)}, is {len(body)}")
    if int(text[:4], 16) != crc16(body.encode("ascii")):
        raise FrameError("bad_crc", f"says {text[:4]}, is {crc16(body.encode('ascii')):04X}")
    match = _REPLY.fullmatch(body)
    if match is None:
        raise FrameError("malformed", f"not a DC-09 reply: {body[:60]!r}")
    rest, encrypted = match["rest"], bool(match["star"])
    if encrypted:
        if key is None:
            raise FrameError("unexpected_encryption", "an encrypted reply, but no key is configured")
        rest = decrypt(rest, key)
    return Reply(match["kind"], int(match["seq"]), match["account"], parse_timestamp(rest), encrypted)


class FrameReader:
    """Cuts a byte stream into reply frames (between LF and CR); drops runaway garbage, never grows unbounded."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while (end := self._buffer.find(b"\r")) >= 0:
            start = self._buffer.rfind(b"\n", 0, end)  # the last LF before the CR: anything before it is noise
            if start >= 0:
                frames.append(bytes(self._buffer[start + 1 : end]))
                self.dropped += start
            else:
                self.dropped += end + 1
            del self._buffer[: end + 1]
        start = self._buffer.rfind(b"\n")
        keep = 0 if start < 0 else len(self._buffer) - start
        if keep > MAX_FRAME_BYTES + 1:  # a frame that never ends
            keep = 0
        self.dropped += len(self._buffer) - keep
        del self._buffer[: len(self._buffer) - keep]
        return frames
