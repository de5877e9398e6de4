"""Log lines are written off the caller's thread: a stdout nobody reads never blocks."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator

import pytest
import structlog

from serialmux import log


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog and the root logger back as they were (configure() is process-wide)."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    if log._writer is not None:
        log._writer.stop()
        log._writer = None
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("restore_logging")
def test_a_stdout_nobody_reads_never_blocks_logging() -> None:
    """With stdout a pipe nobody reads (a stalled journald), 15 000 log calls return at once;
    once it is read the lines arrive in order, and what had to be dropped is counted."""
    unread, writable = os.pipe()
    stream = os.fdopen(writable, "w", encoding="utf-8")
    log.configure("info", stream=stream, json_logs=True)
    logger = log.get_logger("test")
    total = log.LOG_QUEUE + 5_000
    for i in range(total):  # a 64 KiB pipe holds a few hundred: this used to block for ever
        logger.info("line", i=i)

    lines: list[bytes] = []
    done = threading.Event()

    def drain() -> None:
        with os.fdopen(unread, "rb") as pipe:
            for line in pipe:
                lines.append(line)
                if b"log_lines_dropped" in line:
                    done.set()  # the writer got through again
            done.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    assert done.wait(30)
    assert log._writer is not None
    log._writer.stop()  # what is still queued is written
    stream.close()
    reader.join(30)
    got = [json.loads(x) for x in lines]
    numbers = [e["i"] for e in got if e.get("event") == "line"]
    assert numbers[0] == 0
    assert numbers == sorted(numbers)
    notes = [re.search(r"(\d+) log lines dropped", e["event"]) for e in got
             if "log_lines_dropped" in e["event"]]
    dropped = sum(int(note.group(1)) for note in notes if note is not None)
    assert dropped > 0
    assert len(numbers) + dropped == total  # every line written or counted, none twice
