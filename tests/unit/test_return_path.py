"""The return-path / hand-over codec (transport._return_path), sans-IO."""

from __future__ import annotations

import pytest

from transport import (MIG_CMD_X_GO, MIG_CMD_X_NOGO, MIG_RP_MSG_SHUT, MIG_RP_MSG_X_LOADED, NEED_DATA, Message,
                       MessageDecoder, PeerClosed, RemoteProtocolError, encode_go, encode_loaded, encode_nogo,
                       encode_shut)


def test_shut_is_qemus_bytes():
    # migrate_send_rp_shut: be16 MIG_RP_MSG_SHUT (1), be16 len 4, be32 status
    assert encode_shut(0) == b"\x00\x01\x00\x04\x00\x00\x00\x00"
    assert encode_shut(1) == b"\x00\x01\x00\x04\x00\x00\x00\x01"
    assert MIG_RP_MSG_SHUT == 1


def test_our_types_are_outside_qemus_range_and_never_look_like_a_vmdesc():
    for t in (MIG_RP_MSG_X_LOADED, MIG_CMD_X_GO, MIG_CMD_X_NOGO):
        assert t > 7 and t >> 8 != 0x06


def test_byte_by_byte_and_eof():
    dec = MessageDecoder({MIG_RP_MSG_SHUT, MIG_RP_MSG_X_LOADED})
    data = encode_loaded(123456789) + encode_shut(0)
    out = []
    for i in range(len(data)):
        dec.receive_data(data[i:i + 1])
        while (m := dec.next_message()) is not NEED_DATA:
            out.append(m)
    assert out == [Message(MIG_RP_MSG_X_LOADED, 123456789), Message(MIG_RP_MSG_SHUT, 0)]
    dec.receive_data(b"\x00")
    assert dec.next_message() is NEED_DATA
    dec.receive_data(b"")
    assert dec.next_message() == PeerClosed(1)


@pytest.mark.parametrize("raw", [
    b"\x00\x09\x00\x00",  # unknown type
    b"\x00\x01\x00\x05\x00\x00\x00\x00\x00",  # SHUT with the wrong length
    encode_go(5),  # a type this side does not accept
    b"\x00\x00\x00\x00",  # MIG_RP_MSG_INVALID
])
def test_invalid_messages_are_protocol_errors_with_offset(raw):
    dec = MessageDecoder({MIG_RP_MSG_SHUT, MIG_RP_MSG_X_LOADED}, base=1000)
    dec.receive_data(encode_shut(0) + raw)
    assert dec.next_message() == Message(MIG_RP_MSG_SHUT, 0)
    with pytest.raises(RemoteProtocolError, match=r"Received invalid message 0x[0-9a-f]{4} length") as info:
        dec.next_message()
    assert info.value.offset == 1008
    with pytest.raises(RemoteProtocolError):  # the decoder stays dead
        dec.next_message()


def test_forward_direction_skips_one_vm_description():
    dec = MessageDecoder({MIG_CMD_X_GO, MIG_CMD_X_NOGO}, skip_vmdesc=True)
    dec.receive_data(b"\x06\x00\x00\x00\x02{}" + encode_nogo() + encode_go(7))
    assert dec.next_message() == Message(MIG_CMD_X_NOGO, 1)
    assert dec.next_message() == Message(MIG_CMD_X_GO, 7)
    strict = MessageDecoder({MIG_CMD_X_GO})
    strict.receive_data(b"\x06\x00\x00\x00\x02{}")
    with pytest.raises(RemoteProtocolError):
        strict.next_message()
