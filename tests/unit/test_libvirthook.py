"""libvirt hook: which COM1 a domain's XML names, and what the hook links or refuses."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from serialmux.libvirthook import HookProblem, Links, links_of, run

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def domain(devices: str, commandline: str = "") -> bytes:
    """A live domain XML with *devices* (and a ``<qemu:commandline>`` body)."""
    extra = f"<qemu:commandline>{commandline}</qemu:commandline>" if commandline else ""
    return (f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'><name>web-07</name>"
            f"<devices>{devices}</devices>{extra}</domain>").encode()


PTY_COM1 = ("<serial type='pty'><source path='/dev/pts/3'/>"
            "<target type='isa-serial' port='0'/><alias name='serial0'/></serial>"
            "<console type='pty' tty='/dev/pts/3'><target type='serial' port='0'/></console>")


@pytest.mark.parametrize(("devices", "commandline", "want"), [
    (PTY_COM1, "", Links("/dev/pts/3")),
    ("<serial type='pty' tty='/dev/pts/5'><target port='0'/></serial>", "",
     Links("/dev/pts/5")),
    ("<serial type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/w.sock'/>"
     "<target port='0'/></serial>", "", Links("/var/lib/libvirt/qemu/w.sock")),
    # COM2 listed first: COM1 is the one with target port 0
    ("<serial type='pty'><source path='/dev/pts/9'/><target port='1'/></serial>" + PTY_COM1,
     "", Links("/dev/pts/3")),
    (PTY_COM1, "<qemu:arg value='-qmp'/>"
     "<qemu:arg value='unix:/var/lib/libvirt/qemu/w.qmp,server=on,wait=off'/>",
     Links("/dev/pts/3", "/var/lib/libvirt/qemu/w.qmp")),
    (PTY_COM1, "<qemu:arg value='-qmp'/><qemu:arg value='tcp:127.0.0.1:4444,server=on'/>",
     Links("/dev/pts/3")),
])
def test_com1_and_extra_qmp_are_read_from_the_live_xml(
        devices: str, commandline: str, want: Links) -> None:
    """COM1 is the <serial> with target port 0, a PTY or a socket QEMU listens on; a
    -qmp unix:PATH in <qemu:commandline> is its QMP socket (a TCP one is not)."""
    assert links_of(domain(devices, commandline)) == want


@pytest.mark.parametrize(("xml", "says"), [
    (domain(""), "no <serial>"),
    (domain("<serial type='pty'><target port='0'/></serial>"), "without a /dev/pts/N"),
    (domain("<serial type='pty'><source path='/etc/shadow'/></serial>"), "'/etc/shadow'"),
    (domain("<serial type='unix'><source mode='connect' path='/x.sock'/></serial>"),
     "mode='connect'"),
    (domain("<serial type='tcp'><source mode='bind' host='::' service='4555'/></serial>"),
     "type='tcp'"),
    (b"<domain><devices>", "does not parse"),
    (b"<domain><name>\xff\xfe</name></domain>", "does not parse"),
    (b'<!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/shadow">]><domain>&e;</domain>', "DOCTYPE"),
])
def test_a_com1_serialmux_cannot_serve_is_refused_saying_why(xml: bytes, says: str) -> None:
    """XML without a usable COM1 (or not XML libvirt writes) raises HookProblem naming why."""
    with pytest.raises(HookProblem) as caught:
        links_of(xml)
    assert says in str(caught.value)


def test_links_follow_the_domain_and_leave_other_files_alone(tmp_path: Path) -> None:
    """started links NAME.serial (and NAME.qmp), reconnect re-points them in one step;
    stopped removes the links but never a file that is not a link; other operations do
    nothing; a name serialmux would refuse touches no path."""
    qmp = "<qemu:arg value='-qmp'/><qemu:arg value='unix:/run/w.qmp,server=on,wait=off'/>"
    assert run(tmp_path, "web-07", "started", domain(PTY_COM1, qmp)).startswith("linked")
    assert (tmp_path / "web-07.serial").readlink() == Path("/dev/pts/3")
    assert (tmp_path / "web-07.qmp").readlink() == Path("/run/w.qmp")
    run(tmp_path, "web-07", "reconnect", domain(PTY_COM1.replace("pts/3", "pts/4"), qmp))
    assert (tmp_path / "web-07.serial").readlink() == Path("/dev/pts/4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web-07.qmp", "web-07.serial"]
    assert run(tmp_path, "web-07", "prepare", b"") is None
    assert run(tmp_path, "web-07", "stopped", b"") == (
        f"removed {tmp_path / 'web-07.serial'}, {tmp_path / 'web-07.qmp'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert run(tmp_path, "web-07", "release", b"") is None  # nothing left: nothing said
    (tmp_path / "db-01.serial").write_text("not a link")
    assert run(tmp_path, "db-01", "release", b"") is None
    assert (tmp_path / "db-01.serial").exists()
    with pytest.raises(HookProblem, match="not a name serialmux serves"):
        run(tmp_path, "../escape", "started", domain(PTY_COM1))
    assert not (tmp_path.parent / "escape.serial").exists()
    with pytest.raises(HookProblem, match="does not exist"):
        run(tmp_path / "missing", "web-07", "started", domain(PTY_COM1))


def test_a_symlinked_discovery_directory_is_refused(tmp_path: Path) -> None:
    """The hook runs as root: a discovery directory swapped for a symlink makes it link
    nothing, anywhere (every step goes through one O_NOFOLLOW descriptor of the directory)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "vms").symlink_to(elsewhere)
    with pytest.raises(HookProblem, match="not a symlink"):
        run(tmp_path / "vms", "web-07", "started", domain(PTY_COM1))
    (elsewhere / "web-07.serial").symlink_to("/dev/null")
    with pytest.raises(HookProblem, match="not a symlink"):
        run(tmp_path / "vms", "web-07", "stopped", b"")
    assert [p.name for p in elsewhere.iterdir()] == ["web-07.serial"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changes a PTY's group: needs root, as the hook")
def test_a_linked_pty_becomes_readable_by_the_daemons_group(tmp_path: Path) -> None:
    """A PTY is made group tty with no group read, so a daemon that is not root could not
    read a QEMU's console; the hook gives the discovery directory's group read and write
    on it, and a process of that group (not root, not the PTY's owner) can then open it."""
    nobody = pwd.getpwnam("nobody")
    vms = tmp_path / "vms"
    vms.mkdir()
    os.chown(vms, 0, nobody.pw_gid)
    master, slave = os.openpty()
    path = os.ttyname(slave)
    try:
        os.chmod(path, 0o620)
        xml = domain(PTY_COM1.replace("/dev/pts/3", path))
        assert "may read and write it" in (run(vms, "web-07", "started", xml) or "")
        st = os.stat(path)
        assert (st.st_gid, st.st_mode & 0o777) == (nobody.pw_gid, 0o660)
        opened = subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
             "--clear-groups", sys.executable, "-c",
             f"import os; os.close(os.open({path!r}, os.O_RDWR | os.O_NOCTTY)); print('ok')"],
            capture_output=True, text=True, timeout=30, check=False)
        assert opened.stdout == "ok\n", opened.stderr
    finally:
        os.close(master)
        os.close(slave)
