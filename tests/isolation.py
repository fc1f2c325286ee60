"""Run test code in a worker process, so that a crash is one failed test, not the end of the run.

The error paths of the compiled ops, and the generated-input suites that hammer them, once ended a
whole pytest run with one SIGSEGV (a module that carried its own C++ runtime). Here they run in a
spawned worker that is reused from case to case (importing torch costs seconds; a case costs
milliseconds) and replaced when it dies: the case that killed it fails with the signal and the
worker's last words, and the next case gets a fresh worker. CUDA works in the worker (spawned,
never forked).

A target is named "package.module:function" and must be importable in a fresh interpreter (the
worker gets the parent's sys.path). Arguments and return values cross by pickle.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import tempfile
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any


@dataclass
class Outcome:
    """What a target did: ``returned`` (with ``value``), ``raised`` (``exc_type`` is the
    exception's qualified name, ``message`` its str), ``died`` (``message`` names the signal or
    exit code, ``log`` is the worker's stderr) or ``timeout``."""

    kind: str
    value: Any = None
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    log: str = ""

    def skipped(self) -> bool:
        """The target called pytest.skip (e.g. pytest.importorskip of a missing package)."""
        return self.kind == "raised" and self.exc_type.endswith("outcomes.Skipped")

    def describe(self) -> str:
        if self.kind == "returned":
            return f"returned {self.value!r}"
        if self.kind == "raised":
            return f"raised {self.exc_type}: {self.message}\n{self.traceback}"
        return f"{self.kind}: {self.message}\n--- worker stderr (tail) ---\n{self.log}"


def run_search(runner: "IsolatedRunner", target: str, *args: Any, what: str) -> Any:
    """Runs a generated-input search ``target`` in the worker and returns its tally: the test
    skips when the search did (a missing package), fails with the reason when it raised or the
    worker died, and prints the tally (shown with ``pytest -rA``: the reliability table's counts)."""
    import pytest

    outcome = runner.call(target, *args, timeout=1800)
    if outcome.skipped():
        pytest.skip(outcome.message)
    if outcome.kind != "returned":
        pytest.fail(f"{what}: {outcome.describe()}")
    print(f"{what}: {outcome.value}")
    assert sum(outcome.value.values()) > 0, f"{what}: no case ran"
    return outcome.value


def _serve(conn, log_path: str) -> None:
    # The worker's stderr goes to a file, so that what a dying process prints (a signal report,
    # "terminate called after...", an abort message) can be shown with the failure.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    # Messages are compared whole: no C++ stack traces appended to them.
    os.environ.pop("TORCH_SHOW_CPP_STACKTRACES", None)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        target, args, kwargs = request
        module_name, _, function_name = target.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
            value = function(*args, **kwargs)
            reply = ("returned", value, "", "", "")
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            reply = (
                "raised",
                None,
                f"{type(exc).__module__}.{type(exc).__qualname__}",
                str(exc),
                traceback.format_exc(),
            )
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - a value that does not pickle
            conn.send(
                (
                    "raised",
                    None,
                    f"{type(exc).__module__}.{type(exc).__qualname__}",
                    f"the result of {target} could not be sent back: {exc}",
                    traceback.format_exc(),
                )
            )


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class IsolatedRunner:
    """One worker at a time; ``call`` starts it when needed and replaces it after a death."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None
        self._log = None

    def _start(self) -> None:
        handle, self._log = tempfile.mkstemp(prefix="fastad-worker-", suffix=".log")
        os.close(handle)
        self._conn, child = self._ctx.Pipe()
        # Not a daemon, so that a target may start processes of its own; it still ends with the
        # parent, whose end closes the pipe (recv raises EOFError).
        self._proc = self._ctx.Process(target=_serve, args=(child, self._log))
        self._proc.start()
        child.close()

    def _log_tail(self, limit: int = 4000) -> str:
        """The worker's stderr from its last fatal-error report on (or its end), at most ``limit``
        characters: the report's head and its tail when longer. Python lists every loaded
        extension module at the end of such a report, which with scipy and scikit-learn loaded
        is longer than the limit, so a plain tail would lose the line that names the signal."""
        try:
            with open(self._log, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        start = text.rfind("Fatal Python error")
        text = text[start:] if start >= 0 else text[-limit:]
        if len(text) > limit:
            text = text[: limit // 2] + "\n[...]\n" + text[-(limit // 2) :]
        return text

    def _discard(self, grace: float = 0.0) -> None:
        if self._proc is not None:
            self._proc.join(grace)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(10)
            self._conn.close()
        if self._log:
            try:
                os.unlink(self._log)
            except OSError:
                pass
        self._proc = self._conn = self._log = None

    def call(self, target: str, *args: Any, timeout: float = 600, **kwargs: Any) -> Outcome:
        if self._proc is None or not self._proc.is_alive():
            self._discard()
            self._start()
        try:
            self._conn.send((target, args, kwargs))
        except (BrokenPipeError, OSError):
            pass  # the worker died before reading: reported below
        ready = wait([self._conn, self._proc.sentinel], timeout)
        if self._conn in ready:
            try:
                kind, value, exc_type, message, tb = self._conn.recv()
                return Outcome(kind, value, exc_type, message, tb)
            except (EOFError, OSError):
                pass
        if not ready:
            log = self._log_tail()
            self._discard()
            return Outcome("timeout", message=f"no answer within {timeout} s", log=log)
        self._proc.join(10)
        outcome = Outcome(
            "died", message=f"the worker running {target} {_signal_name(self._proc.exitcode)}", log=self._log_tail()
        )
        self._discard()
        return outcome

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)  # asks the worker to return
            except OSError:
                pass
        self._discard(grace=5.0)
