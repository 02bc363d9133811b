"""The sans-IO QMP connection and the command registry.

Spec rules under test (docs/interop/qmp-spec.rst, QEMU's monitor):
* input is a JSON *stream*: values may be split across reads or packed
  together with no separator (qemu.qmp's QMPClient sends no newline);
* output is one JSON object per ``\\r\\n``-terminated line;
* until ``qmp_capabilities`` succeeds only that command exists and no event
  is delivered;
* ``id`` is echoed verbatim when present (any JSON type, ``null`` included)
  and absent otherwise;
* malformed input gets an error reply and the session goes on.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.qmp._commands import SIZE, UINT8, UINT64, CommandTable, Enum, command
from migrator.qmp._protocol import (
    CLOSED,
    NEED_DATA,
    NO_ID,
    ConnectionState,
    ErrorReply,
    Event,
    Greeting,
    QMPConnection,
    Request,
    Return,
    VersionInfo,
)
from migrator.errors import LocalProtocolError, QMPError, StateError

# ---------------------------------------------------------------------------
# helpers


def greeted(**kwargs) -> QMPConnection:
    conn = QMPConnection(**kwargs)
    conn.send(Greeting())
    return conn


def negotiated() -> QMPConnection:
    conn = greeted()
    conn.receive_data(b'{"execute": "qmp_capabilities"}')
    reply = conn.next_event()
    assert reply == Return({})
    conn.send(reply)
    return conn


def drain(conn: QMPConnection) -> list:
    """All events until NEED_DATA/CLOSED; the connection's own answers are sent."""
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            out.append(ev)
            return out
        out.append(ev)
        if not isinstance(ev, Request):
            conn.send(ev)


def sent(conn: QMPConnection, message) -> dict:
    data = conn.send(message)
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1
    return json.loads(data)


REQUESTS = [
    {"execute": "qmp_capabilities", "arguments": {}},
    {"execute": "query-status", "id": "__qmp#00000"},
    {"execute": "x-echo", "arguments": {"s": 'br{ac}es [and] "quotes" \\ é'}, "id": 7},
    {"execute": "query-version", "id": {"nested": [1, None]}},
]
STREAM = b"".join(json.dumps(r).encode() for r in REQUESTS)  # no separators at all


def expected_events() -> list:
    return [
        Return({}),
        Request("query-status", {}, "__qmp#00000"),
        Request("x-echo", {"s": 'br{ac}es [and] "quotes" \\ é'}, 7),
        Request("query-version", {}, {"nested": [1, None]}),
    ]


# ---------------------------------------------------------------------------
# greeting and framing


def test_greeting_shape_is_what_qemu_qmp_and_qmp_shell_need():
    conn = QMPConnection()
    data = conn.send(Greeting(VersionInfo(10, 2, 0, "migrator-0.1")))
    assert data.endswith(b"\r\n")
    msg = json.loads(data)
    assert msg == {
        "QMP": {
            "version": {"qemu": {"major": 10, "minor": 2, "micro": 0}, "package": "migrator-0.1"},
            "capabilities": [],
        }
    }
    assert conn.state is ConnectionState.NEGOTIATING


def test_greeting_must_come_first_and_only_once():
    conn = QMPConnection()
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Return({}))
    conn.send(Greeting())
    with pytest.raises(LocalProtocolError):
        conn.send(Greeting())


def test_one_local_protocol_error_for_qmp_and_the_stream():
    """The QMP connection's misuse error is transport's too (one class
    family), a MigratorError, and keeps its own wording."""
    import transport
    from migrator.errors import MigratorError

    conn = QMPConnection()
    with pytest.raises(transport.LocalProtocolError) as info:
        conn.next_event()
    assert isinstance(info.value, MigratorError) and isinstance(info.value, LocalProtocolError)
    assert str(info.value) == "the greeting must be sent before reading requests"
    assert issubclass(LocalProtocolError, transport.ProtocolError)


def test_concatenated_requests_without_newlines():
    assert b"\n" not in STREAM  # a line-based reader would never see the first request
    conn = greeted()
    conn.receive_data(STREAM)
    got = drain(conn)
    assert got == expected_events() + [NEED_DATA]


def test_byte_at_a_time_returns_need_data_until_each_value_completes():
    conn = greeted()
    got = []
    for i in range(len(STREAM)):
        conn.receive_data(STREAM[i : i + 1])
        evs = drain(conn)
        assert evs[-1] is NEED_DATA
        got.extend(evs[:-1])
    assert got == expected_events()


def test_trailing_partial_request_is_left_buffered():
    conn = greeted()
    whole = json.dumps(REQUESTS[0]).encode()
    conn.receive_data(whole + b'  {"execute": "query-st')
    assert drain(conn) == [Return({}), NEED_DATA]
    conn.receive_data(b'atus"}\r\n')
    assert drain(conn) == [Request("query-status"), NEED_DATA]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_of_the_stream_gives_the_same_events(data):
    cuts = sorted(data.draw(st.sets(st.integers(1, len(STREAM) - 1), max_size=12)))
    pieces = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
    conn = greeted()
    got = []
    for piece in pieces:
        conn.receive_data(piece)
        got.extend(drain(conn)[:-1])
    assert got == expected_events()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=60), max_size=4))
def test_garbage_never_raises_only_error_replies(chunks):
    conn = negotiated()
    for chunk in chunks:
        conn.receive_data(chunk)
    for ev in drain(conn)[:-1]:
        assert isinstance(ev, (Request, ErrorReply, Return))
    # Whatever state the garbage left (e.g. an open string), EOF ends it cleanly.
    conn.receive_data(b"")
    assert drain(conn)[-1] is CLOSED


def test_utf8_split_inside_a_character_and_output_escaping():
    conn = negotiated()
    raw = json.dumps({"execute": "x", "arguments": {"s": "né €"}}, ensure_ascii=False).encode()
    for i in range(len(raw)):
        conn.receive_data(raw[i : i + 1])
    (req, _) = drain(conn)
    assert req.arguments == {"s": "né €"}
    assert conn.send(req.reply({"s": "né"})) == b'{"return": {"s": "n\\u00e9"}}\r\n'


def test_eof_with_partial_value_closes():
    conn = negotiated()
    conn.receive_data(b'{"execute": "query-')
    assert drain(conn) == [NEED_DATA]
    conn.receive_data(b"")
    assert drain(conn) == [CLOSED]
    assert conn.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


# ---------------------------------------------------------------------------
# negotiation gate


def test_commands_before_negotiation_are_refused_with_qemus_words():
    conn = greeted()
    conn.receive_data(b'{"execute": "query-version", "id": 1}{"execute": "no-such-command"}')
    a, b, _ = drain(conn)
    assert a == ErrorReply("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", 1)
    assert b == ErrorReply("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
    assert conn.state is ConnectionState.NEGOTIATING


def test_negotiation_then_repeat_is_refused():
    conn = greeted()
    conn.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}')
    (ok, _) = drain(conn)
    assert ok == Return({}, "n")
    assert conn.state is ConnectionState.READY
    conn.receive_data(b'{"execute": "qmp_capabilities"}{"execute": "query-version"}')
    again, req, _ = drain(conn)
    assert again == ErrorReply(
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
    )
    assert req == Request("query-version")


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({"enable": ["oob"]}, "Capability oob not available"),
        ({"enable": ["bogus"]}, "Parameter 'null' does not accept value 'bogus'"),
        ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
        ({"enable": [1]}, "Invalid parameter type for 'enable[0]', expected: string"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ],
)
def test_bad_qmp_capabilities_leaves_the_gate_closed(arguments, desc):
    conn = greeted()
    conn.receive_data(json.dumps({"execute": "qmp_capabilities", "arguments": arguments}).encode())
    (err, _) = drain(conn)
    assert err == ErrorReply("GenericError", desc)
    assert conn.state is ConnectionState.NEGOTIATING


def test_offered_oob_can_be_enabled():
    conn = QMPConnection()
    conn.send(Greeting(capabilities=("oob",)))
    conn.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert drain(conn)[0] == Return({})
    assert conn.enabled_capabilities == ("oob",)


# ---------------------------------------------------------------------------
# ids and envelope errors


@pytest.mark.parametrize("req_id", ["__qmp#00001", 42, -1.5, {"a": [1, {"b": None}]}, [1, "x"], None, True])
def test_id_of_any_json_type_is_echoed_verbatim(req_id):
    conn = negotiated()
    conn.receive_data(json.dumps({"execute": "x", "id": req_id}).encode())
    (req, _) = drain(conn)
    assert req.id == req_id and req.has_id
    assert sent(conn, req.reply({"ok": 1})) == {"return": {"ok": 1}, "id": req_id}
    assert sent(conn, req.error("GenericError", "no")) == {
        "error": {"class": "GenericError", "desc": "no"},
        "id": req_id,
    }


def test_no_id_when_absent():
    conn = negotiated()
    conn.receive_data(b'{"execute": "x"}')
    (req, _) = drain(conn)
    assert req.id is NO_ID and not req.has_id
    assert sent(conn, req.reply()) == {"return": {}}
    assert sent(conn, req.error("GenericError", "no")) == {"error": {"class": "GenericError", "desc": "no"}}


@pytest.mark.parametrize(
    ("obj", "desc"),
    [
        ({"execute": 1, "id": 3}, "QMP input member 'execute' must be a string"),
        ({"execute": "x", "arguments": [], "id": 3}, "QMP input member 'arguments' must be an object"),
        ({"execute": "x", "bogus": 1, "id": 3}, "QMP input member 'bogus' is unexpected"),
        ({"exec-oob": "x", "id": 3}, "QMP input member 'exec-oob' is unexpected"),
        ({"arguments": {}, "id": 3}, "QMP input lacks member 'execute'"),
    ],
)
def test_malformed_requests_get_generic_error_with_their_id(obj, desc):
    conn = negotiated()
    conn.receive_data(json.dumps(obj).encode())
    (err, _) = drain(conn)
    assert err == ErrorReply("GenericError", desc, 3)


@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'"execute"', "QMP input must be a JSON object"),
        (b"17 ", "QMP input must be a JSON object"),
        (b'{"execute" "x"}', "JSON parse error, expecting ':' delimiter"),
        (b"{1: 2}", "JSON parse error, expecting property name enclosed in double quotes"),
        (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key"),
        (b'{"a": NaN}', "JSON parse error, invalid keyword 'NaN'"),
        (b"nope ", "JSON parse error, invalid keyword 'nope'"),
        (b"@ ", "JSON parse error, stray '@'"),
        (b"}", "JSON parse error, expecting value"),
        (b'{"a": "\xff"}', "JSON parse error, invalid UTF-8 sequence in string"),
    ],
)
def test_malformed_json_gets_an_error_and_the_session_goes_on(raw, desc):
    conn = negotiated()
    conn.receive_data(raw + b'{"execute": "query-version", "id": "after"}')
    err, req, _ = drain(conn)
    assert err == ErrorReply("GenericError", desc)  # never an id: there was no object to take it from
    assert req == Request("query-version", {}, "after")


def test_oversized_and_too_deep_values_are_refused_and_skipped():
    conn = negotiated()
    conn2 = QMPConnection(max_message_bytes=1000)
    conn2.send(Greeting())
    big = json.dumps({"execute": "x", "arguments": {"s": "y" * 5000}}).encode()
    for i in range(0, len(big) - 1, 97):  # memory stays bounded while it streams in
        conn2.receive_data(big[i : min(i + 97, len(big) - 1)])
        assert drain(conn2) == [NEED_DATA]
        assert conn2._splitter.buffered < 1200
    conn2.receive_data(big[-1:] + b'{"execute": "qmp_capabilities"}')
    err, ok, _ = drain(conn2)
    assert err == ErrorReply("GenericError", "JSON token size limit exceeded")
    assert ok == Return({})

    conn.receive_data(b"[" * 1100 + b"]" * 1100 + b'{"execute": "x"}')
    err, req, _ = drain(conn)
    assert err == ErrorReply("GenericError", "JSON nesting depth limit exceeded")
    assert req == Request("x")


# ---------------------------------------------------------------------------
# events


def test_events_only_after_the_negotiation_reply_is_sent():
    ev = Event("STOP", None, 1700000000, 123456)
    conn = greeted()
    assert conn.send(ev) == b""
    conn.receive_data(b'{"execute": "qmp_capabilities"}')
    (reply, _) = drain_without_sending(conn)
    # Negotiation is decided, but qemu.qmp reads the reply with a bare recv():
    # an event before it would fail the handshake.
    assert conn.state is ConnectionState.READY
    assert not conn.accepts_events and conn.send(ev) == b""
    conn.send(reply)
    assert conn.accepts_events
    assert sent(conn, ev) == {"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 123456}}
    data = sent(conn, Event("MIGRATION", {"status": "active"}, 5, 6))
    assert data == {
        "event": "MIGRATION",
        "data": {"status": "active"},
        "timestamp": {"seconds": 5, "microseconds": 6},
    }


def drain_without_sending(conn: QMPConnection) -> list:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return [*out, ev]


def test_event_now_is_stamped_with_the_wall_clock():
    import time

    before = time.time()
    ev = Event.now("X")
    after = time.time()
    assert 0 <= ev.microseconds < 1_000_000
    assert before - 1e-6 <= ev.seconds + ev.microseconds / 1e6 <= after + 1e-6


def test_unencodable_reply_raises_local_protocol_error():
    conn = negotiated()
    with pytest.raises(LocalProtocolError):
        conn.send(Return({"x": object()}))
    with pytest.raises(LocalProtocolError):
        conn.send(Return({"x": float("nan")}))


# ---------------------------------------------------------------------------
# command registry and argument validation


class Recorder:
    """Commands that record their calls, to prove rejected calls have no side effects."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    @property
    def explodes(self):  # registration must not evaluate properties
        raise AssertionError("property evaluated")

    @command("x-set", args={"name": str, "count": int, "*ratio": float, "*flag": bool, "*tags": [str]})
    def x_set(self, name, count, ratio=0.5, flag=False, tags=()):
        self.calls.append(("x-set", dict(name=name, count=count, ratio=ratio, flag=flag, tags=tags)))
        return {"name": name}

    @command(
        "x-caps",
        args={"capabilities": [{"capability": Enum(("events", "xbzrle")), "state": bool}]},
    )
    async def x_caps(self, capabilities):
        await trio.lowlevel.checkpoint()
        self.calls.append(("x-caps", {"capabilities": capabilities}))

    @command(
        "x-sizes", args={"*max-bandwidth": SIZE, "*downtime-limit": UINT64, "*cpu-throttle-initial": UINT8}
    )
    def x_sizes(self, **kw):
        self.calls.append(("x-sizes", kw))
        return kw

    @command("x-fail")
    def x_fail(self):
        raise QMPError("DeviceNotFound", "Device 'foo' not found")

    @command("x-state")
    def x_state(self):
        raise StateError("active", ("none", "completed"))

    @command("x-crash")
    def x_crash(self):
        raise RuntimeError("boom")

    @command("x-hang")
    async def x_hang(self):
        await trio.sleep_forever()


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def table(rec):
    return CommandTable.from_objects(rec)


async def run(table, command, arguments=None, req_id=NO_ID):
    return await table.dispatch(Request(command, arguments or {}, req_id))


async def test_valid_call_and_defaults(table, rec):
    reply = await run(table, "x-set", {"name": "a", "count": 3}, "id1")
    assert reply == Return({"name": "a"}, "id1")
    assert rec.calls == [("x-set", {"name": "a", "count": 3, "ratio": 0.5, "flag": False, "tags": ()})]
    reply = await run(table, "x-set", {"name": "b", "count": -2, "ratio": 2, "flag": True, "tags": ["t"]})
    assert reply == Return({"name": "b"})
    assert rec.calls[-1] == ("x-set", {"name": "b", "count": -2, "ratio": 2.0, "flag": True, "tags": ["t"]})


async def test_unknown_command(table):
    reply = await run(table, "nope", {}, 9)
    assert reply == ErrorReply("CommandNotFound", "The command nope has not been found", 9)


@pytest.mark.parametrize(
    ("command", "arguments", "desc"),
    [
        ("x-set", {"count": 1}, "Parameter 'name' is missing"),
        ("x-set", {"name": "a"}, "Parameter 'count' is missing"),
        ("x-set", {"name": "a", "count": 1, "bogus": 0}, "Parameter 'bogus' is unexpected"),
        # type errors are found before unexpected keys, as QEMU visits members first
        ("x-set", {"bogus": 0, "name": 1, "count": 1}, "Invalid parameter type for 'name', expected: string"),
        ("x-set", {"name": "a", "count": "1"}, "Invalid parameter type for 'count', expected: integer"),
        ("x-set", {"name": "a", "count": 1.0}, "Invalid parameter type for 'count', expected: integer"),
        ("x-set", {"name": "a", "count": True}, "Invalid parameter type for 'count', expected: integer"),
        ("x-set", {"name": "a", "count": 2**63}, "Invalid parameter type for 'count', expected: integer"),
        (
            "x-set",
            {"name": "a", "count": 1, "ratio": "x"},
            "Invalid parameter type for 'ratio', expected: number",
        ),
        (
            "x-set",
            {"name": "a", "count": 1, "flag": 1},
            "Invalid parameter type for 'flag', expected: boolean",
        ),
        (
            "x-set",
            {"name": "a", "count": 1, "tags": "t"},
            "Invalid parameter type for 'tags', expected: array",
        ),
        (
            "x-set",
            {"name": "a", "count": 1, "tags": [1]},
            "Invalid parameter type for 'tags[0]', expected: string",
        ),
        (
            "x-caps",
            {"capabilities": [{"capability": "events"}]},
            "Parameter 'capabilities[0].state' is missing",
        ),
        (
            "x-caps",
            {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "nope", "state": True},
                ]
            },
            "Parameter 'capability' does not accept value 'nope'",
        ),
        (
            "x-caps",
            {"capabilities": [{"capability": "events", "state": True, "x": 1}]},
            "Parameter 'capabilities[0].x' is unexpected",
        ),
        ("x-caps", {"capabilities": [3]}, "Invalid parameter type for 'capabilities[0]', expected: object"),
        ("x-sizes", {"cpu-throttle-initial": 256}, "Parameter 'cpu-throttle-initial' expects uint8_t"),
        ("x-sizes", {"max-bandwidth": "1"}, "Parameter 'max-bandwidth' expects uint64"),
        ("x-sizes", {"max-bandwidth": 2**64}, "Parameter 'max-bandwidth' expects uint64"),
        ("x-fail", {"a": 1}, "Parameter 'a' is unexpected"),
    ],
)
async def test_bad_arguments_are_refused_before_any_side_effect(table, rec, command, arguments, desc):
    reply = await run(table, command, arguments, "r")
    assert reply == ErrorReply("GenericError", desc, "r")
    assert rec.calls == []


async def test_uint64_accepts_negative_integers_by_wrapping_like_qemu(table):
    reply = await run(
        table, "x-sizes", {"downtime-limit": -1, "max-bandwidth": 2**64 - 1, "cpu-throttle-initial": 255}
    )
    assert reply.value == {
        "downtime_limit": 2**64 - 1,
        "max_bandwidth": 2**64 - 1,
        "cpu_throttle_initial": 255,
    }


async def test_async_handler_and_nested_struct(table, rec):
    caps = [{"capability": "events", "state": True}]
    assert await run(table, "x-caps", {"capabilities": caps}) == Return({})
    assert rec.calls == [("x-caps", {"capabilities": caps})]


async def test_handler_errors_become_replies(table, caplog):
    assert await run(table, "x-fail", {}, 1) == ErrorReply("DeviceNotFound", "Device 'foo' not found", 1)
    assert await run(table, "x-state") == ErrorReply(
        "GenericError", "Migration is in state 'active', expected one of: 'none', 'completed'"
    )
    with caplog.at_level(logging.ERROR, logger="migrator.qmp"):
        assert await run(table, "x-crash") == ErrorReply("GenericError", "boom")
    assert "x-crash" in caplog.text and "RuntimeError" in caplog.text


async def test_cancellation_is_never_swallowed(table):
    reached = False
    with trio.move_on_after(0.01) as scope:
        await run(table, "x-hang")
        reached = True
    assert scope.cancelled_caught and not reached


def test_registration_rules(rec):
    table = CommandTable.from_objects(rec)
    assert table.names() == ["x-set", "x-caps", "x-sizes", "x-fail", "x-state", "x-crash", "x-hang"]
    with pytest.raises(ValueError, match="registered twice"):
        table.register(Recorder())
    with pytest.raises(ValueError, match="declares no QMP command"):
        table.register(object())

    @command("x-free", args={"*a-b": int})
    def free(a_b=0):
        return a_b

    table.register(free)
    assert "x-free" in table and len(table) == 8
    with pytest.raises(TypeError):
        command("x", args={"a": complex})
    with pytest.raises(TypeError):
        command("x", args={"a": [int, str]})
