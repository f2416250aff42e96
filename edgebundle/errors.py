"""Every error edgebundle raises on purpose, in one tree.

The CLI boundary turns these into one clear line on stderr and an exit code; nothing
below it prints or exits. Each error's message says what is wrong *and* how to fix
it, because it is what the user reads.

::

    EdgebundleError                 exit 1   base; anything the job could not do
    ├── UsageError                  exit 2   the command line or its inputs are wrong
    │   ├── ConfigError             exit 2   a config file, URL or option value is invalid
    │   ├── InputTakenError         exit 2   a turn's input id names a message that is no turn's
    │   ├── MutationGapError        exit 2   a push skips mutation ids (.expected: the next one)
    │   ├── PinError                exit 2   a lock file (pins) is malformed or names nothing usable
    │   └── ManifestError           exit 2   a fleet manifest is invalid (.problems: every one,
    │                                        file:line:column: key.path: what is wrong); the
    │                                        check `fleet validate` reports them and exits 1
    ├── UnverifiedPinError          exit 1   a pin has no known sha256 (no --allow-unverified)
    ├── DownloadError               exit 1   a download failed (network, HTTP status, bundle file)
    │   ├── ChecksumMismatchError   exit 1   downloaded bytes do not match the pinned sha256
    │   └── ChecksumSourceError     exit 1   the publisher's SHA256SUM cannot vouch for a file
    │                                        (missing, not over https, does not list it)
    ├── InstallError                exit 1   unpacking or switching an installation failed
    ├── RuntimeNotFoundError        exit 1   no usable runtime (wasmedge binary, embedded deps)
    ├── ModelError                  exit 1   a model file is missing, not GGUF, or truncated
    ├── SupervisorError             exit 1   the supervised process could not be started or kept up
    │   └── GuestProtocolError      exit 1   the chat guest wrote something that is not its protocol
    ├── RedisAccessError            exit 1   the sync Redis cannot be reached or refused us
    ├── StateError                  exit 1   state stored in Redis or on disk cannot be read
    │                                        (not JSON, an unknown status): the store's fault,
    │                                        not the command line's
    ├── GatewayError                exit 1   the chat's gateway cannot be reached or refused us
    └── SyncError                   exit 1   a sync operation on a thread could not be done
        ├── ThreadNotFoundError     exit 1   the thread does not exist (expired or never created)
        ├── RunNotFoundError        exit 1   the run does not exist in the thread (or expired)
        ├── EpochMismatchError      exit 1   the client's epoch is not the thread's (.epoch)
        ├── ThreadBusyError         exit 1   a run is active and the policy is reject (.retry_after)
        ├── LeaseLostError          exit 1   the run no longer holds the thread; nothing was written
        ├── OfflineError            exit 1   the device is offline and this needs the central store
        └── LimitError              exit 1   a cap of the device (edgebundle.limits) leaves no room;
            │                                nothing was written
            ├── MessageTooLargeError exit 1  a message's content is over max_message_bytes
            ├── ThreadFullError     exit 1   the thread would pass max_thread_messages
            └── BusyError           exit 1   at a cap on load: retry after .retry_after s
                ├── TooManyRunsError exit 1  this device generates max_runs turns already
                └── QueueFullError  exit 1   the thread has max_queued_runs runs waiting in line

Outside the tree only: Python's built-ins for a caller's bug (``ValueError`` for a
check id reported twice, a function name the library lacks), ``ValueError`` inside
pydantic validators (pydantic turns it into a ManifestError problem), and parse
errors caught where they arise (an ELF or JSON reader turns them into one of these).

A leaf: it imports nothing of edgebundle. Errors that carry a feature's objects type
them by the little they need (:class:`ManifestProblem`, :class:`RunObject`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class ManifestProblem(Protocol):
    """What a ManifestError carries per problem (edgebundle.fleet.manifest_file.Problem):
    ``str()`` is ``file:line:column: key.path: what is wrong``."""

    def to_json(self) -> dict[str, Any]: ...


class RunObject(Protocol):
    """The run a ThreadBusyError names (edgebundle.sync.models.Run)."""

    def to_json(self) -> dict[str, Any]: ...


class EdgebundleError(Exception):
    """Base of every deliberate edgebundle error."""

    exit_code = 1


class UsageError(EdgebundleError):
    """The command line or one of its inputs is wrong."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value (file, URL, option) is invalid."""


class InputTakenError(UsageError):
    """A turn's input id names a message of the thread that started no run."""


class MutationGapError(UsageError):
    """A push skips mutation ids: a device's mids of a thread go 1, 2, 3 … and the
    thread expects ``expected`` next. Nothing of the push was written."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


class PinError(UsageError):
    """A lock file is malformed, or names no asset for this platform."""


class ManifestError(UsageError):
    """A fleet manifest is invalid: ``problems`` lists every one, in file order.

    A usage error (exit 2) for the commands that act on a manifest (plan, apply):
    the input file is wrong. ``fleet validate`` is a check and exits 1 instead.
    """

    def __init__(self, message: str, problems: Sequence[ManifestProblem]) -> None:
        super().__init__(message)
        self.problems = problems


class UnverifiedPinError(EdgebundleError):
    """A pin without a known sha256 was asked for without --allow-unverified."""


class DownloadError(EdgebundleError):
    """A download could not be completed."""


class ChecksumMismatchError(DownloadError):
    """Downloaded bytes differ from the pinned sha256; the file was discarded."""


class ChecksumSourceError(DownloadError):
    """A release's SHA256SUM could not vouch for a file: not served over https, missing,
    unreadable, or without (or with two different) lines for the file name."""


class InstallError(EdgebundleError):
    """Unpacking or activating an installation failed; the previous one stays active."""


class RuntimeNotFoundError(EdgebundleError):
    """No usable runtime was found."""


class ModelError(EdgebundleError):
    """A model file is missing or not a usable GGUF file."""


class SupervisorError(EdgebundleError):
    """The supervised runtime could not be started or kept running."""


class GuestProtocolError(SupervisorError):
    """The chat guest's stdout broke the protocol (edgebundle.guest_protocol)."""


class RedisAccessError(EdgebundleError):
    """The sync Redis could not be reached, or refused the connection."""


class StateError(EdgebundleError):
    """State stored in Redis (or on disk) cannot be read: not JSON, not an object, a
    status this version does not know. Rewriting it (e.g. ``fleet apply``) fixes it."""


class GatewayError(EdgebundleError):
    """A gateway this process is a client of (``edgebundle chat``) cannot be reached,
    or refused a request."""


class SyncError(EdgebundleError):
    """A sync operation on a thread could not be done (see edgebundle.sync)."""


class ThreadNotFoundError(SyncError):
    """The thread does not exist: it expired (sliding TTL) or was never created."""


class RunNotFoundError(SyncError):
    """The run does not exist in the thread (unknown id, or it expired with the thread)."""


class EpochMismatchError(SyncError):
    """The client's epoch is not the thread's: resync in full, or re-seed if ``epoch`` is None.

    ``epoch`` is the thread's current epoch, or None when the thread is gone (expired).
    """

    def __init__(self, message: str, epoch: str | None) -> None:
        super().__init__(message)
        self.epoch = epoch


class ThreadBusyError(SyncError):
    """A run is generating on the thread and the policy said reject: retry after ``retry_after`` s.

    ``active_run`` is the run in the way (the active one, or the next queued one).
    """

    def __init__(self, message: str, active_run: RunObject | None, retry_after: int) -> None:
        super().__init__(message)
        self.active_run = active_run
        self.retry_after = retry_after


class LeaseLostError(SyncError):
    """The run no longer holds the thread (lease expired, cancelled, interrupted).

    Nothing of the write that raised it was stored.
    """


class OfflineError(SyncError):
    """The device is offline (the central Redis does not answer) and what was asked
    needs it: a thread it never saw, a run on another device."""


class LimitError(SyncError):
    """A cap of the device (:mod:`edgebundle.limits`) leaves no room for what was asked;
    checked before anything is written, so nothing was."""


class MessageTooLargeError(LimitError):
    """A message's content is over ``max_message_bytes`` (UTF-8)."""


class ThreadFullError(LimitError):
    """The thread would hold more than ``max_thread_messages`` messages: start a new one."""


class BusyError(LimitError):
    """The device is at a cap on load: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyRunsError(BusyError):
    """This device already has ``max_runs`` turns going."""


class QueueFullError(BusyError):
    """The thread already has ``max_queued_runs`` runs waiting in line."""
