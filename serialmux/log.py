"""Logging and audit, configured once.

Operational logs go through structlog: JSON lines when stdout is not a
terminal (journald, files), a readable rendering on a terminal. asyncssh's
stdlib records are rendered the same way through ``ProcessorFormatter``.

Audit events (:class:`Audit`) are a separate, stable stream: one JSON object
per event with ``id`` (unique), ``index`` (increasing in this process),
``time`` (UTC), ``event`` and the facts of the event. They go to the daemon's
log and, when configured, to an audit file reopened on SIGUSR1 for rotation.
Console bytes never appear in either; strings that come from users are
escaped and length-capped by :func:`clean`.

Log lines are written by a thread of their own, not by the event loop: a
journald (or a pipe) that stops taking stdout would otherwise stall every
console at its next log line. Up to :data:`LOG_QUEUE` records wait for it;
past that they are dropped, counted, and the count is logged once the writer
gets through again (``log_lines_dropped``).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import structlog

MAX_FIELD = 200  # characters kept of any user-supplied string
#: Log records waiting for the writer thread; more are dropped (and counted) meanwhile.
LOG_QUEUE = 10_000
#: The longest the process waits at exit for the writer to write what is queued.
FLUSH_AT_EXIT = 2.0


def clean(value: object, limit: int = MAX_FIELD) -> object:
    """Escape control characters in user-supplied strings and cap their length."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="backslashreplace")
    if not isinstance(value, str):
        return value
    out = value.encode("unicode_escape").decode("ascii") if not value.isprintable() else value
    return out if len(out) <= limit else out[: limit - 1] + "…"


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with milliseconds and a ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def configure(level: str = "info", *, stream: TextIO | None = None, json_logs: bool | None = None
              ) -> None:
    """Set up structlog and the stdlib root logger (asyncssh) to render alike."""
    stream = stream or sys.stdout
    if json_logs is None:
        json_logs = not stream.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if json_logs
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    global _writer
    if _writer is not None:
        _writer.stop()
    handoff = _Handoff(queue.Queue(LOG_QUEUE))
    _writer = _Writer(handoff, handler)
    _writer.start()
    root = logging.getLogger()
    root.handlers[:] = [handoff]
    root.setLevel(level.upper())
    # asyncssh logs every packet-level step at INFO; keep its warnings only.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


class _Handoff(logging.handlers.QueueHandler):
    """Queues each record for the writer thread as it is, never waiting; counts what it drops."""

    def __init__(self, records: queue.Queue[Any]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The default renders the message here, on the caller's thread, and turns
        # structlog's event dict into a string; the writer's formatter needs the dict.
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(logging.handlers.QueueListener):
    """The thread that writes log lines; reports records the handoff had to drop."""

    def __init__(self, handoff: _Handoff, handler: logging.Handler) -> None:
        super().__init__(handoff.queue, handler)
        self._handoff = handoff
        self._reported = 0

    def handle(self, record: logging.LogRecord) -> None:
        super().handle(record)
        dropped = self._handoff.dropped
        if dropped != self._reported:
            note = logging.LogRecord(
                "serialmux.log", logging.WARNING, __file__, 0,
                f"log_lines_dropped: {dropped - self._reported} log lines dropped while "
                "stdout took nothing", None, None)
            self._reported = dropped
            super().handle(note)

    def enqueue_sentinel(self) -> None:
        with contextlib.suppress(queue.Full):  # full: the thread is a daemon thread anyway
            self.queue.put_nowait(self._sentinel)  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Write what is queued (at most FLUSH_AT_EXIT seconds), then end the thread."""
        thread = self._thread
        if thread is None:
            return
        self.enqueue_sentinel()
        thread.join(FLUSH_AT_EXIT)
        self._thread = None


_writer: _Writer | None = None


@atexit.register
def _flush_logs() -> None:
    if _writer is not None:
        _writer.stop()


def get_logger(name: str) -> Any:
    """Return a structlog logger for *name*."""
    return structlog.get_logger(name)


log = get_logger(__name__)


class Audit:
    """The audit trail: one JSON object per event, to the log and an optional file."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._file: TextIO | None = None
        self._index = itertools.count(1)
        self._lock = threading.Lock()
        self._log = structlog.get_logger("serialmux.audit")
        self.file_error: str | None = None  # why the last write to the file failed, if it did
        self.listeners: list[Any] = []  # callables taking the event dict (tests, control socket)
        if path is not None:
            self.reopen()

    def reopen(self) -> None:
        """(Re)open the audit file, e.g. after logrotate moved it (SIGUSR1)."""
        if self._path is None:
            return
        with self._lock:
            old = self._file
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
            if old is not None:
                old.close()

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Record one audit event and return it."""
        record: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "index": next(self._index),
            "time": utc_now(),
            "event": event,
        }
        for key, value in fields.items():
            if value is not None:
                record[key] = clean(value)
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
        self._log.info(event, audit=True, **{k: v for k, v in record.items() if k != "event"})
        with self._lock:
            if self._file is not None:
                self._write_file(line)
        for listener in self.listeners:
            listener(record)
        return record

    def _write_file(self, line: str) -> None:
        # A full or failing disk must not turn every audited step (logins, attaches,
        # port changes) into an exception: the event is in the log already; say once
        # per failure streak that the file misses events.
        assert self._file is not None
        try:
            self._file.write(line + "\n")
        except OSError as exc:
            if self.file_error is None:
                log.error("audit_file_write_failed", path=str(self._path), error=str(exc))
            self.file_error = str(exc)
            return
        if self.file_error is not None:
            self.file_error = None
            log.info("audit_file_write_recovered", path=str(self._path))

    def close(self) -> None:
        """Close the audit file (closed even if its last lines cannot be written)."""
        with self._lock:
            file, self._file = self._file, None
            if file is not None:
                try:
                    file.close()
                except OSError as exc:
                    log.error("audit_file_write_failed", path=str(self._path), error=str(exc))
