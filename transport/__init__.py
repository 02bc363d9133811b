"""QEMU's migration stream for RAM, as a sans-IO codec, plus trio channels.

* :class:`StreamEncoder` / :class:`StreamDecoder`: the savevm v3 format
  (header, configuration, sections with footers, the ``"ram"`` section's
  records, our ``"migrator-vcpus"`` device section, QEMU's ``-M none``
  device sections (``_vmstate``), EOF, the VM description JSON).  No I/O.
* ``_multifd``: QEMU 7.2's multifd handshake and packet headers.
* :func:`open_channel`, :func:`listen_channel`, :func:`serve_once`: move the
  bytes over ``tcp:``, ``unix:`` or ``file:`` URIs with trio.
* :class:`RateLimiter`: QEMU's max-bandwidth accounting in 100 ms windows.
* :class:`MessageDecoder` and ``encode_*``: QEMU's return-path messages
  (``MIG_RP_MSG_SHUT``) and our hand-over messages (``x-handover``).
* :class:`SourceSession` / :class:`DestinationSession`: one migration stream
  per end over the codec (section order and ids, device sections, EOF, the
  VM description) and its return path, decided once by
  :func:`decide_return_path` from the :class:`StreamKind`, the channel and
  ``x-handover``.  No I/O.
"""

from ._decoder import ConnectionClosed, StreamDecoder
from ._encoder import EncodedPages, StreamEncoder
from ._events import (
    NEED_DATA,
    Sentinel,
    Configuration,
    DeviceState,
    EndOfStream,
    Event,
    RamEOS,
    RamMemSize,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamHeader,
    VMDescription,
    VMStateSection,
)
from ._ratelimit import RateLimiter, RateLimiterStatistics
from ._return_path import (
    MIG_CMD_X_GO,
    MIG_CMD_X_NOGO,
    MIG_RP_MSG_SHUT,
    MIG_RP_MSG_X_LOADED,
    Message,
    MessageDecoder,
    PeerClosed,
    encode_go,
    encode_loaded,
    encode_nogo,
    encode_shut,
)
from ._session import (
    MACHINE_NAME,
    DestinationSession,
    GoAhead,
    Loaded,
    NoGo,
    ReturnPath,
    Shut,
    SourceSession,
    StreamKind,
    decide_return_path,
)
from ._wire import (
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_SECTION_IDSTR,
    RAM_SECTION_INSTANCE,
    RAM_SECTION_VERSION,
    TARGET_PAGE_SIZE,
    VCPU_SECTION_IDSTR,
    VCPU_SECTION_INSTANCE,
    VCPU_SECTION_VERSION,
)
from .channel import (
    Channel,
    ChannelListener,
    FileAddress,
    TcpAddress,
    UnixAddress,
    listen_channel,
    open_channel,
    parse_uri,
    serve_once,
)
from .errors import (
    BadURIError,
    ChannelError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
)

__all__ = [
    "MACHINE_NAME",
    "DestinationSession",
    "GoAhead",
    "Loaded",
    "NoGo",
    "ReturnPath",
    "Shut",
    "SourceSession",
    "StreamKind",
    "decide_return_path",
    "Sentinel",
    "MIG_CMD_X_GO",
    "MIG_CMD_X_NOGO",
    "MIG_RP_MSG_SHUT",
    "MIG_RP_MSG_X_LOADED",
    "NEED_DATA",
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "RAM_SECTION_IDSTR",
    "RAM_SECTION_INSTANCE",
    "RAM_SECTION_VERSION",
    "TARGET_PAGE_SIZE",
    "VCPU_SECTION_IDSTR",
    "VCPU_SECTION_INSTANCE",
    "VCPU_SECTION_VERSION",
    "BadURIError",
    "Channel",
    "ChannelError",
    "ChannelListener",
    "Configuration",
    "ConnectionClosed",
    "DeviceState",
    "EncodedPages",
    "EndOfStream",
    "Event",
    "FileAddress",
    "LocalProtocolError",
    "Message",
    "MessageDecoder",
    "PeerClosed",
    "ProtocolError",
    "RamEOS",
    "RamMemSize",
    "RamPages",
    "RamZeroPages",
    "RateLimiter",
    "RateLimiterStatistics",
    "RemoteProtocolError",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionPart",
    "SectionStart",
    "StreamDecoder",
    "StreamEncoder",
    "StreamHeader",
    "TcpAddress",
    "TransportError",
    "UnixAddress",
    "VMDescription",
    "encode_go",
    "encode_loaded",
    "encode_nogo",
    "encode_shut",
    "VMStateSection",
    "listen_channel",
    "open_channel",
    "parse_uri",
    "serve_once",
]
