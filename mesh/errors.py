"""The one error tree of mesh.

Every error says what was wrong and, where it helps, what would be valid.
Layers raise the subclass that names them; callers catch ``MeshError``.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error mesh raises on purpose."""


class ConfigError(MeshError):
    """A bad flag, env var or config value; the message names the field and valid choices."""


class TransportError(MeshError):
    """A link failed: connect refused, reset, timed out, or closed."""


class FrameError(TransportError):
    """A frame on the wire is malformed (bad header, dtype, shape or length).

    The connection that sent it is closed; the node keeps serving.
    """


class AuthenticationError(TransportError):
    """A peer could not prove it holds the cluster key, or the node identity it claims."""


class PeerTimeout(TransportError):
    """A send, receive or remote call did not finish within its timeout."""


class KernelError(MeshError):
    """A kernel input is malformed or violates a kernel invariant (event, clock, state, buffer)."""


class ClockDriftError(KernelError):
    """A remote timestamp is too far ahead of local physical time; the clock is unchanged."""


class ModelError(MeshError):
    """A model could not be found, read or understood."""


class BackendError(MeshError):
    """A compute backend failed to load a layer range or run a step."""


class StageFailed(BackendError):
    """The stage itself is gone, not the step's input at fault: a tensor-parallel group lost a
    member (spec B19). A request's step that raises it fails over to a new plan (spec FO3)."""


class PlacementError(MeshError):
    """No valid placement exists; the message names the shortfall."""


class PluginError(MeshError):
    """A plugin could not be found or loaded."""


class RequestFailed(MeshError):
    """A generation request failed in the cluster (a stage failed, timed out or was lost)."""


class ApiError(MeshError):
    """A client request is invalid; carries the HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s  # the Retry-After header of a 429 or 503, if any

    def to_json(self) -> dict[str, object]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
