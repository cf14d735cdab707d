"""A scripted ``Connection`` for tests of what sits above a transport (``mesh.node.links``):
``recv`` returns the scripted messages in order, then fails as a closed link does; ``send``
records what was sent. No I/O, no waits."""

from __future__ import annotations

from mesh.errors import TransportError
from mesh.security import PeerIdentity
from mesh.wire import Message
from transports.base import Connection, LinkStats


class ScriptedConnection(Connection):
    """A link whose peer says ``script`` and then closes; ``peer_identity`` as given."""

    def __init__(self, script: list[Message], *, identity: PeerIdentity | None = None,
                 peer: str = "127.0.0.1:9") -> None:
        self._script = list(script)
        self._identity = identity
        self._peer = peer
        self.sent: list[Message] = []
        self._closed = False

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> LinkStats:
        return LinkStats(frames_sent=len(self.sent))

    @property
    def peer_identity(self) -> PeerIdentity | None:
        return self._identity

    async def send(self, msg: Message, *, timeout_s: float, lane: str = "control") -> None:
        self.sent.append(msg)

    async def recv(self, *, timeout_s: float | None = None) -> Message:
        if self._closed or not self._script:
            raise TransportError(f"connection to {self._peer} is closed (end of script)")
        return self._script.pop(0)

    async def close(self) -> None:
        self._closed = True
