"""The errors of the HPC agent (executor, wipe, measurements, channel).

    TrustcapError                      (trustcap.errors)
    └── AgentError                     anything the agent raises on purpose
        ├── IsolationError             a run's isolation spec is malformed (field named) or cannot be applied
        ├── EngineError                the Docker Engine failed or is unreachable (translated in `engine.py`)
        │   └── ImageMissing           the image is not present locally (no registry is reachable)
        ├── WipeError                  a wipe step failed or could not be verified; the node is not clean
        ├── OutputError                a capsule's /output/result is missing, not a regular file or too large
        ├── RunRequestError            a prepare/run/result/finish request is malformed (field named) or out of turn
        ├── EnrolmentError             boot enrolment cannot proceed (missing cmdline key, bad token)
        └── ChannelError               the agent<->gateway channel failed (auth, decrypt, framing, rekey)

Docker SDK errors are translated in exactly one place, `trustcap.agent.engine`, so every caller only
needs `AgentError`; `tests/agent/test_engine.py` checks that every docker error we can meet is mapped.
"""

from __future__ import annotations

from trustcap.channel import ChannelError as CoreChannelError
from trustcap.errors import TrustcapError

__all__ = ["AgentError", "ChannelError", "EngineError", "EnrolmentError", "ImageMissing", "IsolationError",
           "OutputError", "RunRequestError", "WipeError"]


class AgentError(TrustcapError):
    """Base of every error the agent raises on purpose."""


class IsolationError(AgentError):
    """The isolation spec is malformed (the message names the field) or the host cannot apply it."""


class EngineError(AgentError):
    """The Docker Engine refused or failed an operation, or does not answer."""


class ImageMissing(EngineError):
    """The image is not in the local engine; nothing is pulled implicitly (no registry is reachable)."""


class WipeError(AgentError):
    """A wipe step failed or its verification did not hold: the node must not be declared clean."""


class OutputError(AgentError):
    """The capsule's result cannot be taken: missing, not a regular file (a link, a FIFO) or too large."""


class RunRequestError(AgentError):
    """A capsule request from the gateway is malformed (the message names the field) or out of turn."""


class EnrolmentError(AgentError):
    """Boot enrolment cannot proceed: a required kernel command-line key is missing or malformed."""


class ChannelError(AgentError, CoreChannelError):
    """The agent<->gateway channel failed: authentication, decryption, framing or key rotation.
    A subclass of the core's `trustcap.channel.ChannelError`, so one `except` catches every channel
    failure, whichever layer raised it."""
