"""serialmux.qmp against a fake QMP server that misbehaves on cue: typed errors, never a hang.

The fake is the one allowed fake: a real UNIX socket in tmp_path speaking QMP lines, so the
client under test runs unmodified (qemu.qmp's streams, our timeouts and reconnect loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from serialmux.errors import HypervisorError, HypervisorTimeout, HypervisorUnavailable
from serialmux.qmp import Hypervisor

pytestmark = pytest.mark.timeout(30)

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
#: Every misbehaviour must surface as a typed error within this many seconds.
PROMPTLY = 3.0


class FakeQMP:
    """A QMP server on a UNIX socket; ``mode`` picks how it answers commands.

    silent: never greets. hang: never replies. malformed: replies with broken JSON.
    huge: replies with a 1 MiB line. eof: closes in the middle of a reply.
    good: answers query-status / query-chardev / anything else with ``{}``.
    In any mode but silent it greets with ``greeting``, and ``replies[command]`` (a whole reply
    object, which gets the command's id unless it has its own) overrides the answer to a command;
    ``delays[command]`` holds each answer to that command back for so many seconds.
    """

    def __init__(self, path: Path, mode: str = "good", status: str = "running") -> None:
        self.path = path
        self.mode = mode
        self.status = status
        self.pty = "pty:/dev/pts/7"  # serial0's filename in query-chardev
        self.greeting: Any = GREETING
        self.replies: dict[str, Any] = {}
        self.delays: dict[str, float] = {}  # seconds a command's answer is held back
        self.commands: list[tuple[str, Any]] = []
        self.connections = 0
        self._changed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._handle, path=str(self.path), limit=4 * 1024 * 1024
        )

    async def close(self) -> None:
        """Stop listening and drop every client, like QEMU exiting."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        self.path.unlink(missing_ok=True)
        async with asyncio.timeout(5.0):  # handlers see EOF and finish
            while self._handlers:
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, what: str, count: int, timeout: float = 5.0) -> None:
        """Wait until ``connections`` or ``commands`` reaches ``count``."""
        async with asyncio.timeout(timeout):
            while len(self.commands) < count if what == "commands" else self.connections < count:
                self._changed.clear()
                await self._changed.wait()

    def event(self, name: str, data: dict[str, Any]) -> None:
        """Send a QMP event to every connected client."""
        stamp = {"seconds": int(time.time()), "microseconds": 0}
        for writer in self._writers:
            writer.write(self._line({"event": name, "data": data, "timestamp": stamp}))

    @staticmethod
    def _line(message: Any) -> bytes:
        return json.dumps(message).encode() + b"\r\n"

    def _note(self) -> None:
        self._changed.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._handlers += 1
        self._writers.append(writer)
        self._note()
        try:
            if self.mode == "silent":
                await reader.read()  # hold the connection, say nothing
                return
            writer.write(self._line(self.greeting))
            async for message in self._messages(reader):
                command, ident = message["execute"], message.get("id")
                if command == "qmp_capabilities" and command not in self.replies:
                    writer.write(self._line({"return": {}, "id": ident}))
                    continue
                self.commands.append((command, message.get("arguments")))
                self._note()
                if not await self._answer(writer, command, ident):
                    return
        except ConnectionError:
            return
        finally:
            writer.close()
            self._handlers -= 1
            self._note()

    @staticmethod
    async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
        """JSON objects as QEMU's monitor reads them: a stream, newlines optional."""
        decoder = json.JSONDecoder()
        buffer = ""
        while chunk := await reader.read(65536):
            buffer += chunk.decode()
            while buffer.strip():
                try:
                    message, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break  # incomplete: read more
                buffer = buffer.lstrip()[end:]
                yield message

    async def _answer(self, writer: asyncio.StreamWriter, command: str, ident: Any) -> bool:
        """Reply to one command as ``mode`` says; False ends the connection."""
        if self.mode == "hang":
            return True
        if command in self.delays:
            await asyncio.sleep(self.delays[command])
        if command in self.replies:
            writer.write(self._line({"id": ident, **self.replies[command]}))
        elif self.mode == "malformed":
            writer.write(b'{"return": {"status": running}, "id": ' + json.dumps(ident).encode())
            writer.write(b"}\r\n")
        elif self.mode == "huge":
            writer.write(b'{"return": "' + b"x" * (1024 * 1024) + b'", "id": "x"}\r\n')
        elif self.mode == "eof":
            writer.write(b'{"return": {"status": "runn')
            await writer.drain()
            return False
        elif command == "missing-command":
            error = {
                "class": "CommandNotFound",
                "desc": "The command missing-command was not found",
            }
            writer.write(self._line({"error": error, "id": ident}))
        elif command == "query-status":
            reply = {"status": self.status, "running": self.status == "running"}
            writer.write(self._line({"return": reply, "id": ident}))
        elif command == "query-chardev":
            chardevs = [
                {"label": "serial0", "filename": self.pty, "frontend-open": True},
                {"label": "qmp", "filename": "unix:/x/qmp.sock,server=on", "frontend-open": True},
            ]
            writer.write(self._line({"return": chardevs, "id": ident}))
        else:
            writer.write(self._line({"return": {}, "id": ident}))
        await writer.drain()
        return True


@contextlib.asynccontextmanager
async def serving(fake: FakeQMP) -> AsyncIterator[FakeQMP]:
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@contextlib.asynccontextmanager
async def running(hypervisor: Hypervisor) -> AsyncIterator[Hypervisor]:
    """Run the hypervisor's connect loop in a TaskGroup for the duration of the block."""
    async with asyncio.TaskGroup() as group:
        task = group.create_task(hypervisor.run())
        try:
            yield hypervisor
        finally:
            task.cancel()


def hypervisor(path: Path, **kwargs: Any) -> Hypervisor:
    kwargs.setdefault("command_timeout", 1.0)
    kwargs.setdefault("connect_timeout", 1.0)
    return Hypervisor("vm1", f"unix:{path}", **kwargs)


async def test_no_greeting_gives_unavailable(tmp_path: Path) -> None:
    """A server that never greets leaves the client unconnected and execute() unavailable."""
    async with serving(FakeQMP(tmp_path / "q.sock", "silent")) as fake:
        hv = hypervisor(fake.path, connect_timeout=0.3)
        async with running(hv):
            # A second connection means the first attempt gave up on the greeting.
            await fake.wait_for("connections", 2)
            assert not hv.connected
            started = time.monotonic()
            with pytest.raises(HypervisorUnavailable, match="greeting") as caught:
                await hv.execute("query-status")
            assert time.monotonic() - started < PROMPTLY
            assert caught.value.vm == "vm1"


async def test_missing_socket_gives_unavailable_at_once(tmp_path: Path) -> None:
    """With no QEMU at the address, execute() fails at once and says the socket is missing."""
    hv = hypervisor(tmp_path / "absent.sock")
    async with running(hv):
        assert not await hv.wait_connected(0.3)
        with pytest.raises(HypervisorUnavailable, match="does not exist"):
            await hv.execute("query-status")


async def test_reply_never_comes_times_out(tmp_path: Path) -> None:
    """A command whose reply never comes raises HypervisorTimeout after command_timeout."""
    async with serving(FakeQMP(tmp_path / "q.sock", "hang")) as fake:
        hv = hypervisor(fake.path, command_timeout=0.5)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            started = time.monotonic()
            with pytest.raises(HypervisorTimeout, match=r"no reply within 0\.5 s"):
                await hv.status()
            assert time.monotonic() - started < PROMPTLY
            with pytest.raises(HypervisorTimeout):  # the next command is not stuck behind it
                await hv.nmi()


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("malformed", HypervisorError, "malformed QMP"),
        ("huge", HypervisorError, "longer than"),
        ("eof", HypervisorUnavailable, "middle of a message"),
    ],
)
async def test_broken_reply_gives_typed_error(
    tmp_path: Path, mode: str, error: type[HypervisorError], message: str
) -> None:
    """Malformed JSON, a 1 MiB line and EOF mid-reply each end in a typed error, promptly."""
    async with serving(FakeQMP(tmp_path / "q.sock", mode)) as fake:
        hv = hypervisor(fake.path, command_timeout=PROMPTLY * 2)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            started = time.monotonic()
            with pytest.raises(error, match=message) as caught:
                await hv.status()
            assert time.monotonic() - started < PROMPTLY
            assert not isinstance(caught.value, HypervisorTimeout)
            # The broken session is dropped and a fresh one is made.
            await fake.wait_for("connections", 2)


async def test_error_reply_carries_qmp_class(tmp_path: Path) -> None:
    """An error reply raises HypervisorError with QMP's class, and the session stays up."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            with pytest.raises(HypervisorError, match="was not found") as caught:
                await hv.execute("missing-command")
            assert caught.value.error_class == "CommandNotFound"
            assert type(caught.value) is HypervisorError
            assert hv.connected
            assert await hv.status() == "running"


async def test_good_server_results_and_commands(tmp_path: Path) -> None:
    """status(), chardev_pty(), chardev_of_pty(), nmi(), reset(), sysrq() and send_break()
    send the right QMP and parse replies."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            assert await hv.status() == "running"
            assert await hv.chardev_pty("serial0") == "/dev/pts/7"
            assert await hv.chardev_pty("qmp") is None
            assert await hv.chardev_pty("nonesuch") is None
            assert await hv.chardev_of_pty("/dev/pts/7") == "serial0"
            assert await hv.chardev_of_pty("/dev/pts/8") is None
            await hv.nmi()
            await hv.reset()
            await hv.sysrq("h")
            await hv.send_break("serial0")
            keys = [{"type": "qcode", "data": k} for k in ("alt", "sysrq", "h")]
            assert fake.commands[-4:] == [
                ("inject-nmi", None),
                ("system_reset", None),
                ("send-key", {"keys": keys}),
                ("chardev-send-break", {"id": "serial0"}),
            ]


async def test_chardev_lookups_take_what_qemu_names_and_nothing_else(tmp_path: Path) -> None:
    """chardev_of_unix() matches QEMU's listening, disconnected and (through qom-get addr)
    dialing chardevs by path, and takes a path with a NUL or a relative one as no match;
    chardev_of_peer() matches our end also as QEMU's IPv4-mapped form, and only a TCP one."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        fake.replies["query-chardev"] = {"return": [
            {"label": "srv", "filename": "unix:/run/a.sock,server=on"},
            {"label": "gone", "filename": "disconnected:unix:/run/b.sock"},
            {"label": "dial", "filename": "unix:"},
            {"label": "v6", "filename": "tcp:[::]:4555,server=on <-> [::ffff:127.0.0.1]:40000"},
            {"label": "v4", "filename": "tcp:127.0.0.1:4556,server=on <-> 127.0.0.1:40001"},
            {"label": "tn", "filename": "telnet:127.0.0.1:4557,server=on <-> 127.0.0.1:40002"},
        ]}
        hv = hypervisor(fake.path)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            assert await hv.chardev_of_unix("/run/a.sock") == "srv"
            assert await hv.chardev_of_unix("/run/./b.sock") == "gone"
            fake.replies["qom-get"] = {"return": {"type": "unix", "path": "/run/c.sock"}}
            assert await hv.chardev_of_unix("/run/c.sock") == "dial"
            for bad in ("/run/c.sock\u0000x", "c.sock"):
                fake.replies["qom-get"] = {"return": {"type": "unix", "path": bad}}
                assert await hv.chardev_of_unix("/run/c.sock") is None
            assert await hv.chardev_of_peer("127.0.0.1", 40000) == "v6"
            assert await hv.chardev_of_peer("127.0.0.1", 40001) == "v4"
            assert await hv.chardev_of_peer("127.0.0.1", 40002) is None
            assert await hv.chardev_of_peer("127.0.0.2", 40001) is None


async def test_a_slow_qemu_bounds_the_whole_unix_chardev_lookup(tmp_path: Path) -> None:
    """With many dialing chardevs each answered slowly, chardev_of_unix() gives up after one
    command_timeout in all (not one per chardev), as a HypervisorTimeout."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        fake.replies["query-chardev"] = {"return": [
            {"label": f"dial{i}", "filename": "unix:"} for i in range(6)]}
        fake.replies["qom-get"] = {"return": {"type": "unix", "path": "/elsewhere.sock"}}
        fake.delays["qom-get"] = 0.5
        hv = hypervisor(fake.path, command_timeout=1.0)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            with pytest.raises(HypervisorTimeout, match="did not name the chardev"):
                await hv.chardev_of_unix("/run/c.sock")
            # Without the one bound, all six would have been asked (each under 1 s).
            assert [c for c, _ in fake.commands].count("qom-get") < 6


@pytest.mark.parametrize("key", ["", "hh", "H", "!", " ", "\n"])
async def test_sysrq_rejects_bad_keys(tmp_path: Path, key: str) -> None:
    """sysrq() refuses anything but one of 0-9 a-z, before sending anything."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            with pytest.raises(HypervisorError, match="not a SysRq key"):
                await hv.sysrq(key)
            assert fake.commands == []


async def test_events_are_delivered(tmp_path: Path) -> None:
    """QMP events reach on_event with their name and data, in order."""
    seen: list[tuple[str, dict[str, Any]]] = []
    arrived = asyncio.Event()

    def on_event(name: str, data: dict[str, Any]) -> None:
        seen.append((name, data))
        if name == "RESUME":
            arrived.set()

    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path, on_event=on_event)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            fake.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
            fake.event("STOP", {})
            fake.event("RESUME", {})
            async with asyncio.timeout(PROMPTLY):
                await arrived.wait()
    assert seen == [
        ("RESET", {"guest": False, "reason": "host-qmp-system-reset"}),
        ("STOP", {}),
        ("RESUME", {}),
    ]


async def test_failing_callback_does_not_end_session(tmp_path: Path) -> None:
    """An exception raised by on_event is logged; the session and later events carry on."""
    seen: list[str] = []
    arrived = asyncio.Event()

    def on_event(name: str, data: dict[str, Any]) -> None:
        seen.append(name)
        if name == "STOP":
            raise RuntimeError("callback bug")
        arrived.set()

    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path, on_event=on_event)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            fake.event("STOP", {})
            fake.event("RESUME", {})
            async with asyncio.timeout(PROMPTLY):
                await arrived.wait()
            assert hv.connected
            assert await hv.status() == "running"
    assert seen == ["STOP", "RESUME"]
    assert fake.connections == 1


async def test_reconnects_after_server_restart(tmp_path: Path) -> None:
    """When QEMU's QMP socket goes away and comes back, the client reconnects by itself."""
    path = tmp_path / "q.sock"
    hv = hypervisor(path, max_backoff=0.5)
    async with running(hv):
        async with serving(FakeQMP(path, status="running")):
            assert await hv.wait_connected(PROMPTLY)
            assert await hv.status() == "running"
        async with serving(FakeQMP(path, status="paused")) as second:
            await second.wait_for("connections", 1)
            assert await hv.wait_connected(PROMPTLY)
            assert await hv.status() == "paused"


async def test_command_during_lost_session_is_unavailable(tmp_path: Path) -> None:
    """A command sent while QEMU is gone raises HypervisorUnavailable, not a hang."""
    path = tmp_path / "q.sock"
    hv = hypervisor(path)
    async with running(hv):
        async with serving(FakeQMP(path, "hang")) as fake:
            assert await hv.wait_connected(PROMPTLY)
            status = asyncio.ensure_future(hv.status())
            await fake.wait_for("commands", 1)
        with pytest.raises(HypervisorUnavailable, match="closed the QMP connection"):
            async with asyncio.timeout(PROMPTLY):
                await status


def test_bad_address_is_rejected() -> None:
    """An address that is neither unix:PATH nor tcp:HOST:PORT is refused at construction."""
    for address in ("/tmp/x.sock", "tcp:host", "tcp:host:http", "unix:", "udp:h:1"):
        with pytest.raises(HypervisorError, match="neither unix:PATH nor tcp:HOST:PORT"):
            Hypervisor("vm1", address)


@pytest.mark.parametrize("filename", ["pty:/etc/shadow", "pty:/dev/pts/7/../../sda",
                                      "pty:/dev/pts/", "pty:/dev/pts/7\n", "pty:/dev/sda"])
async def test_chardev_pty_outside_dev_pts_is_refused(tmp_path: Path, filename: str) -> None:
    """chardev_pty returns only /dev/pts/N paths; anything else QMP names is None."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            assert await hv.chardev_pty("serial0") == "/dev/pts/7"
            fake.pty = filename
            assert await hv.chardev_pty("serial0") is None


_CHARDEV_REPLIES = [
    1,
    None,
    {},
    "serial0",
    [1, 2],
    ["pty:/dev/pts/7"],
    [None],
    [{"label": "serial0", "filename": 7}],
    [{"label": "serial0", "filename": ["pty:/dev/pts/7"]}],
    [{"label": "serial0"}],
    [{"label": 0, "filename": "pty:/dev/pts/7"}],
    [{"label": "qmp", "filename": "unix:/x"}, {"label": "serial0", "filename": None}],
    ["x" * 100_000],
]
_STATUS_REPLIES = [1, None, [], {}, {"status": 1}, {"status": None}, "running"]


@pytest.mark.parametrize(
    ("command", "reply", "good"),
    [("query-chardev", r, "/dev/pts/7") for r in _CHARDEV_REPLIES]
    + [("query-status", r, "running") for r in _STATUS_REPLIES],
)
async def test_malformed_reply_gives_hypervisor_error(tmp_path: Path, command: str,
                                                      reply: Any, good: str) -> None:
    """A query-chardev or query-status reply of the wrong shape is a HypervisorError naming
    the VM, the socket and the command (not a TypeError), and the session carries on."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            ask = (lambda: hv.chardev_pty("serial0")) if command == "query-chardev" \
                else hv.status
            fake.replies[command] = {"return": reply}
            with pytest.raises(HypervisorError, match=command) as caught:
                await ask()
            assert type(caught.value) is HypervisorError
            assert caught.value.vm == "vm1"
            assert str(fake.path) in str(caught.value)
            assert len(str(caught.value)) < 400  # a huge reply is quoted, not copied
            del fake.replies[command]
            assert await ask() == good  # the same session answers the next one
            assert fake.connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        {},
        {"result": {}},
        {"error": "boom"},
        {"error": {"class": 1, "desc": "boom"}},
        {"error": {"class": "GenericError"}},
        {"return": {}, "id": ["not", "hashable"]},
    ],
)
async def test_malformed_reply_envelope_gives_hypervisor_error(tmp_path: Path, reply: Any) -> None:
    """A reply without "return" or a well-formed "error" (or with a bad id) is a HypervisorError."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        hv = hypervisor(fake.path, command_timeout=PROMPTLY * 2)
        async with running(hv):
            assert await hv.wait_connected(PROMPTLY)
            fake.replies["inject-nmi"] = reply
            started = time.monotonic()
            with pytest.raises(HypervisorError, match="inject-nmi") as caught:
                await hv.nmi()
            assert time.monotonic() - started < PROMPTLY
            assert not isinstance(caught.value, HypervisorTimeout)
            assert str(fake.path) in str(caught.value)


_BAD_GREETINGS = [
    {"QMP": 1},
    {"hello": "world"},
    {"QMP": {"version": [], "capabilities": []}},
    {"QMP": {"version": {}, "capabilities": 3}},
    [1, 2],
    "QMP",
]
_BAD_NEGOTIATIONS = [
    {"error": {"class": "GenericError", "desc": "no"}}, {}, {"return": {}, "error": "x"},
]


@pytest.mark.parametrize(
    ("stage", "message", "why"),
    [("greeting", m, "greeting was not understood") for m in _BAD_GREETINGS]
    + [("qmp_capabilities", m, "qmp_capabilities was not accepted") for m in _BAD_NEGOTIATIONS],
)
async def test_bad_handshake_is_not_a_session(tmp_path: Path, stage: str, message: Any,
                                              why: str) -> None:
    """A greeting of the wrong shape, or a qmp_capabilities reply that is not a plain
    "return", makes no session; execute() is unavailable and says why."""
    async with serving(FakeQMP(tmp_path / "q.sock")) as fake:
        if stage == "greeting":
            fake.greeting = message
        else:
            fake.replies["qmp_capabilities"] = message
        hv = hypervisor(fake.path)
        async with running(hv):
            await fake.wait_for("connections", 2)  # the first attempt failed and it retried
            assert not hv.connected
            with pytest.raises(HypervisorUnavailable, match=why):
                await hv.execute("query-status")
