"""Overrides ``socketio.packet.Packet``: the Socket.IO packet class Postbox
uses, and what makes a packet from a client acceptable.

python-socketio walks every outgoing payload recursively looking for bytes
(``Packet.data_is_binary``) to choose between a text and a binary packet.
Postbox never emits bytes (its payloads are JSON objects, and files go over
HTTP), and the walk cost about a tenth of the event loop's time under a DM
load, so this class skips it.

Incoming packets are held to what the Socket.IO v5 protocol allows (the
checks of the reference parser, socket.io-parser's ``isPayloadValid``):
``JsonPacket.problem`` names what is wrong with one. Two payloads are
valid JSON that orjson refuses: one nested deeper than it allows decodes
as ``too_deep``, and one holding a lone surrogate escape (``"\\ud800"``,
what JS's ``JSON.stringify`` makes of half an emoji) as
``lone_surrogate``, instead of failing, so that the event can still be
answered. Their data is not decoded: a string with a lone surrogate would
reach no handler anyway (orjson cannot encode it back, PostgreSQL refuses
it).

An ack of at least ``TEXT_BYTES_FROM`` bytes of JSON (an inbox, a page
of history or of ``sync``) is encoded to UTF-8 bytes, a ``Utf8Text``, and
never made a str: the socket's writer sends it as a text frame as it is
(``engineio_socket``). Decoding megabytes of JSON to a str and encoding
it back cost several times serializing it.

Upstream names touched: ``Packet.data_is_binary`` (overridden: never
binary), ``Packet.decode`` (overridden: a payload too deep, or with a
lone surrogate, decodes as ``too_deep`` or ``lone_surrogate``; relies on
the header being decoded before the data, hence its hash in ``COPIED``),
``Packet.encode`` (overridden for acks: mirrors its header, hence its
hash), ``Packet.attachment_count`` (read).
"""
import json

from socketio import packet

from server import fastjson
from server.transport.json_depth import is_depth_error
from server.upstream.engineio_socket import Utf8Text

UPSTREAM = packet.Packet
PRIVATE_NAMES = {}
COPIED = {
    # JsonPacket.decode reads the header decoded before the data failed.
    'socketio.packet.Packet.decode': '61ad7904b539f472',
    # JsonPacket.encode writes an ack's header as this does.
    'socketio.packet.Packet.encode': '513c45be75181da2',
}

# An ack whose JSON is at least this long goes out as UTF-8 bytes.
TEXT_BYTES_FROM = 16 * 1024

BINARY = (packet.BINARY_EVENT, packet.BINARY_ACK)
# Longest text checked for lone surrogates (a message body is at most
# 4,000 characters: its event, escaped, well under this).
SURROGATE_CHECK_MAX = 64 * 1024


def _lone_surrogate(exc: ValueError) -> bool:
    """Whether orjson refused its text (``exc.doc``) only for a lone
    surrogate escape: the text is JSON all the same (the stdlib reads
    it), or a nesting too deep for the stdlib too. Only for a text of at
    most SURROGATE_CHECK_MAX characters: the stdlib parses ten times
    slower than orjson, before the event spends a token. A longer one
    is malformed (no event that long is valid anyway)."""
    doc = getattr(exc, 'doc', None)
    if 'surrogate' not in str(exc) or not doc or \
            len(doc) > SURROGATE_CHECK_MAX:
        return False
    try:
        json.loads(doc)
    except ValueError:
        return False  # not JSON anyway: malformed
    except RecursionError:
        pass  # lone surrogates nested very deep: refused all the same
    return True


def _event_name_ok(name) -> bool:
    # socket.io-parser accepts a string or a number (not a boolean)
    return isinstance(name, str) or (
        isinstance(name, (int, float)) and not isinstance(name, bool))


class JsonPacket(packet.Packet):
    too_deep = False  # the data did not decode: nested beyond the parser
    lone_surrogate = False  # nor this: a string with a lone surrogate

    @classmethod
    def data_is_binary(cls, data):
        return False

    def encode(self):
        """python-socketio's; an ack of ``TEXT_BYTES_FROM`` bytes of JSON
        and more as a ``Utf8Text``."""
        if self.packet_type != packet.ACK or self.data is None:
            return super().encode()
        head = str(packet.ACK)
        if self.namespace is not None and self.namespace != '/':
            head += self.namespace + ','
        if self.id is not None:
            head += str(self.id)
        body = fastjson.dumps_bytes(self.data)
        if len(body) < TEXT_BYTES_FROM:
            return head + body.decode()
        return Utf8Text(head.encode() + body)

    @property
    def undecoded(self) -> bool:
        """Whether the data, valid JSON, was left undecoded (``too_deep``
        or ``lone_surrogate``): an event to answer, an ack to drop."""
        return self.too_deep or self.lone_surrogate

    def decode(self, encoded_packet):
        try:
            return super().decode(encoded_packet)
        except (ValueError, RecursionError) as exc:
            if is_depth_error(exc):
                self.too_deep = True
            elif _lone_surrogate(exc):
                self.lone_surrogate = True
            else:
                raise
            # The header (type, namespace, id) decoded before the data.
            self.data = None
            return 0

    def problem(self) -> str | None:
        """What makes this decoded packet from a client invalid, or None.
        An ``undecoded`` event or ack is not invalid here: it is answered
        (or dropped)."""
        kind, data = self.packet_type, self.data
        if self.attachment_count and kind not in BINARY:
            return 'attachments on a text packet'
        if kind == packet.CONNECT:
            if self.id is not None or not (data is None or
                                           isinstance(data, dict)):
                return 'connect payload must be an object'
        elif kind == packet.DISCONNECT:
            if self.id is not None or data is not None or \
                    self.undecoded:
                return 'disconnect takes no payload'
        elif kind in (packet.EVENT, packet.BINARY_EVENT):
            if self.undecoded:
                return None
            if not isinstance(data, list) or not data or \
                    not _event_name_ok(data[0]):
                return 'event payload must be [name, ...]'
        elif kind in (packet.ACK, packet.BINARY_ACK):
            if self.id is None:
                return 'ack without an id'
            if not self.undecoded and not isinstance(data, list):
                return 'ack payload must be an array'
        else:
            return 'unexpected packet type'
        return None
