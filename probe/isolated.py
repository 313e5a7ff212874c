"""Run a function in a child process with a time limit.

Bytes that no seal vouches for (a cache written before caches were sealed, a foreign HDF5
file) are parsed by libhdf5, a C library: a damaged byte can crash it (SIGSEGV) or make it
loop forever. Such parsing happens only here, in a fresh process (`spawn`: no state shared
with the caller), so a crash or a hang is one `ProbeError` in the caller, never its death.

The answer comes back as JSON, not pickle: the parent never unpickles what a process that
read a hostile file sends it.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
from typing import Any, Callable

from .errors import ProbeError

_ERRORS = {}  # ProbeError subclasses by name, filled on first use


class IsolationError(ProbeError):
    """The child process crashed, hung past its time limit or answered nonsense.
    `reason` says which, in words a message can take over."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def run_isolated(function: Callable[..., Any], *args: Any, timeout: float,
                 what: str) -> Any:
    """`function(*args)` in a spawned child process; its JSON-serialisable result.

    A `ProbeError` raised in the child is raised again here with its class and message.
    A crash (a signal, an exit without an answer) or no answer within `timeout` seconds
    (the child is killed) is an `IsolationError` whose message starts with `what`
    ("reading cache file 'x.h5'"). `function` must be importable (module level)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, function, args), daemon=True)
    child.start()
    sender.close()  # the child holds the only writer: EOF once it is gone
    try:
        answer = _receive(receiver, child, timeout)
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if answer is None:
        reason = _crash_reason(child.exitcode, timeout)
        raise IsolationError(f"{what} {reason}", reason)
    return _unpack(answer, what)


def _receive(receiver, child, timeout: float) -> bytes | None:
    """The child's one message, or None when it died or did not answer in time."""
    try:
        if receiver.poll(timeout):
            return receiver.recv_bytes()
    except (EOFError, OSError):
        pass  # it died without answering
    return None


def _crash_reason(exitcode: int | None, timeout: float) -> str:
    if exitcode is None or exitcode == -signal.SIGKILL:
        return f"did not finish within {timeout:.0f} s (the process was stopped)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"crashed the process that did it ({name})"
    return f"ended the process that did it without an answer (exit code {exitcode})"


def _unpack(answer: bytes, what: str) -> Any:
    try:
        message = json.loads(answer)
        kind, payload = message["kind"], message["payload"]
    except (ValueError, TypeError, KeyError):
        raise IsolationError(f"{what} gave an answer that could not be read", "garbled") \
            from None
    if kind == "ok":
        return payload
    error_class = _error_classes().get(payload.get("type"), ProbeError) \
        if isinstance(payload, dict) else ProbeError
    text = payload.get("message") if isinstance(payload, dict) else None
    if kind == "error" and isinstance(text, str):
        raise error_class(text)
    raise IsolationError(f"{what} failed unexpectedly ({text})", "failed")


def _error_classes() -> dict[str, type]:
    """ProbeError and its subclasses by name: the child's error is raised again as is."""
    if not _ERRORS:
        pending = [ProbeError]
        while pending:
            cls = pending.pop()
            _ERRORS[cls.__name__] = cls
            pending.extend(cls.__subclasses__())
    return _ERRORS


def _child(sender, function: Callable[..., Any], args: tuple) -> None:
    try:
        message = {"kind": "ok", "payload": function(*args)}
    except ProbeError as error:
        message = {"kind": "error",
                   "payload": {"type": type(error).__name__, "message": str(error)}}
    except BaseException as error:  # noqa: BLE001 - reported to the parent, in one line
        message = {"kind": "failed", "payload": {"type": type(error).__name__,
                                                 "message": f"{type(error).__name__}: "
                                                            f"{' '.join(str(error).split())}"}}
    sender.send_bytes(json.dumps(message).encode())
    sender.close()
