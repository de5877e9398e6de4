"""The CLI's side of the control socket: one request, attaching a terminal, rendering status.

Plain blocking sockets, no asyncio: the CLI sends one request line and reads
one reply (the protocol is described in :mod:`serialmux.control`), or for
``attach`` puts the terminal in raw mode and pumps bytes both ways until
either side closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import termios
import tty
from pathlib import Path
from typing import Any

from .control import ADMIN_GROUP, MAX_LINE, _short_path, socket_path
from .errors import ControlError

CLIENT_TIMEOUT = 60.0


def render_status(report: dict[str, Any]) -> list[str]:
    """``serialmux status`` for people: one block per VM."""
    lines = [f"serialmux: {report['summary']} (pid {report['pid']}, since {report['started']})",
             f"listening: {', '.join(report['listeners'])}; control: {report['control']}"]
    if report["disabled"]:
        lines.append(f"disabled: {report['disabled']}")
    for vm in report["vms"]:
        state = "up" if vm["up"] else f"down ({vm['down_reason']})"
        lines.append(f"{vm['name']}: {state} since {vm['state_since']}; {vm['port']}"
                     f" [{vm['source']}]")
        ring = vm["ring"]
        ring_text = (f"ring of {ring['size']} bytes, {ring['bytes_written']} written"
                     if ring else "no ring")
        lines.append(f"  since the daemon started: read {vm['bytes_read']} bytes; {ring_text}")
        if vm["disabled"]:
            lines.append(f"  disabled: {vm['disabled']}")
        for att in ([vm["writer"]] if vm["writer"] else []) + vm["watchers"]:
            lines.append(f"  {att['mode']:<7} {att['user']} ({att['peer']}) since {att['since']}")
    return lines


def connect(runtime_dir: Path, timeout: float = CLIENT_TIMEOUT) -> socket.socket:
    """Connect to the daemon's control socket; ControlError says what to do if impossible."""
    path = socket_path(runtime_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        with _short_path(path) as address:
            sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise ControlError(f"no daemon listening on {path}: is serialmux running? "
                           "(systemctl status serialmux)") from exc
    except PermissionError as exc:
        sock.close()
        raise ControlError(f"permission denied on {path}: run as root or as a member of "
                           f"the '{ADMIN_GROUP}' group") from exc
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot connect to {path}: {exc.strerror}") from exc
    return sock


def _read_line(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Read one reply line; return it and whatever bytes came after it."""
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError("the daemon closed the control connection without a reply")
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ControlError("the daemon's reply is too long")
    line, rest = buf.split(b"\n", 1)
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the daemon refused the request")))
    return reply, rest


def request(runtime_dir: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Send one request and return the daemon's reply; ControlError if it failed."""
    with connect(runtime_dir) as sock:
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            return _read_line(sock)[0]
        except (OSError, ValueError) as exc:
            raise ControlError(f"control connection failed: {exc}") from exc


def attach(runtime_dir: Path, payload: dict[str, Any], stdin_fd: int, stdout_fd: int) -> None:
    """Attach to a console: the terminal goes raw; returns when the session ends."""
    interactive = os.isatty(stdin_fd)
    with connect(runtime_dir) as sock:
        sock.sendall(json.dumps({**payload, "cmd": "attach",
                                 "interactive": interactive}).encode() + b"\n")
        _reply, early = _read_line(sock)
        sock.settimeout(None)
        saved = termios.tcgetattr(stdin_fd) if interactive else None
        try:
            if interactive:
                tty.setraw(stdin_fd)
            _write_all(stdout_fd, early)
            _pump(sock, stdin_fd, stdout_fd)
        finally:
            if saved is not None:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)


def _pump(sock: socket.socket, stdin_fd: int, stdout_fd: int) -> None:
    watch: list[Any] = [sock, stdin_fd]
    while True:
        readable, _, _ = select.select(watch, [], [])
        if sock in readable:
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                return
            _write_all(stdout_fd, data)
        if stdin_fd in readable:
            data = os.read(stdin_fd, 65536)
            if data:
                sock.sendall(data)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                watch.remove(stdin_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
