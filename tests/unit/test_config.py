"""Config errors name the file, line and key; authorized_keys options are implemented or refused."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from serialmux.config import ConfigError, Role, load_config

KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "serialmux.toml"
    path.write_text(body)
    return path


BASE = f"""\
[server]
listen = ["127.0.0.1:0"]

[vms.web-01]
port = "pty:/dev/pts/99"

[users.alice]
keys = ["{KEY}"]
"""


@pytest.mark.parametrize("option", ["restrict", "no-pty", 'command="/bin/sh"', "permitopen=\"x:1\"",
                                    "cert-authority", "frobnicate"])
def test_authorized_key_options_other_than_from_are_refused(tmp_path: Path, option: str) -> None:
    """restrict, no-*, command= and unknown options are load errors naming file and line."""
    keys = tmp_path / "alice.keys"
    keys.write_text(f"# alice\n{option} {KEY}\n")
    path = write(tmp_path, BASE.replace(f'keys = ["{KEY}"]', f'authorized_keys = "{keys}"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert f"{path}:8: users.alice.authorized_keys:" in text
    assert f"{keys} line 2: option" in text
    assert "not supported" in text


def test_from_option_is_implemented(tmp_path: Path) -> None:
    """from= is parsed and enforced per address."""
    path = write(tmp_path, BASE.replace(f'"{KEY}"', f"'from=\"10.0.0.0/8,!10.9.9.9\" {KEY}'"))
    key = load_config(path).users["alice"].keys[0]
    assert key.allows_from("10.1.2.3")
    assert not key.allows_from("10.9.9.9")
    assert not key.allows_from("192.168.0.1")


def test_ssh_limits_default_to_sshd(tmp_path: Path) -> None:
    """Without [ssh], the limits are sshd's defaults."""
    ssh = load_config(write(tmp_path, BASE)).ssh
    assert (ssh.login_timeout, ssh.max_auth_tries, ssh.max_startups) == (30, 6, (10, 30, 100))
    assert (ssh.penalty_authfail, ssh.keepalive_interval, ssh.keepalive_count_max) == (5, 15, 3)
    assert (ssh.penalty_noauth, ssh.penalty_exempt) == (1, ())
    assert ssh.per_source_max_startups is None


def test_penalty_exempt_takes_addresses_and_networks(tmp_path: Path) -> None:
    """penalty_exempt lists addresses and CIDR networks, IPv4 and IPv6."""
    body = BASE + '[ssh]\npenalty_exempt = ["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"]\n'
    nets = [str(n) for n in load_config(write(tmp_path, body)).ssh.penalty_exempt]
    assert nets == ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "fd00::/8"]


@pytest.mark.parametrize(("snippet", "where"), [
    ('[ssh]\nmax_startups = "10:200:5"\n', "10: ssh.max_startups"),
    ("[ssh]\nmax_auth_tries = 0\n", "10: ssh.max_auth_tries"),
    ("[ssh]\nper_source_max_startups = 0\n", "10: ssh.per_source_max_startups"),
    ('[ssh]\npenalty_exempt = ["10.0.0.300"]\n', "10: ssh.penalty_exempt"),
    ("[ssh]\npenalty_noauth = -1\n", "10: ssh.penalty_noauth"),
    ('[ssh]\nlogin_timout = 3\n', "10: ssh.login_timout"),
    ('[server.x]\n', "9: server.x"),

    ('[discovery]\ndir = "/run/serialmux/vms"\nlibvirt = "qemu:///system"\n',
     "11: discovery.libvirt: is not a key"),
])
def test_ssh_errors_name_line_and_key(tmp_path: Path, snippet: str, where: str) -> None:
    """Bad [ssh] values are reported as FILE:LINE: KEY: message."""
    path = write(tmp_path, BASE + snippet)
    with pytest.raises(ConfigError, match=rf"{path}:{where}:"):
        load_config(path)


@pytest.mark.parametrize(("server", "says"), [
    ('listen = ["127.0.0.1:0", "127.0.0.1:0"]', "server.listen: '127.0.0.1:0' is listed twice"),
    ('listen = ["127.0.0.1:0"]\nhost_keys = ["/k", "/k"]',
     "server.host_keys: a host key file is listed twice"),
])
def test_a_listen_address_or_host_key_listed_twice_is_refused(
        tmp_path: Path, server: str, says: str) -> None:
    """The same listen address or host key file twice is a load error (two listeners on
    one port 0, or two keys of one type, are never what was meant)."""
    path = write(tmp_path, BASE.replace('listen = ["127.0.0.1:0"]', server))
    with pytest.raises(ConfigError, match=says):
        load_config(path)


def test_redact_rules_global_and_per_vm(tmp_path: Path) -> None:
    """[server] redact applies to every VM, before the VM's own rules."""
    body = BASE.replace('listen = ["127.0.0.1:0"]',
                        'listen = ["127.0.0.1:0"]\nredact = ["hunter2"]')
    body = body.replace('port = "pty:/dev/pts/99"',
                        'port = "pty:/dev/pts/99"\nredact = [{name = "aws", pattern = "AKIA.+"}]')
    vm = load_config(write(tmp_path, body)).vms["web-01"]
    assert [r.name for r in vm.redact] == ["secret", "aws"]


def test_bad_redact_rule_names_line(tmp_path: Path) -> None:
    """An invalid redact regex names the file, line and key."""
    body = BASE.replace('port = "pty:/dev/pts/99"', 'port = "pty:/dev/pts/99"\nredact = ["("]')
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=rf"{path}:6: vms.web-01.redact: item 0: invalid regex"):
        load_config(path)


def test_groups_and_mfa_grants(tmp_path: Path) -> None:
    """A group grant gives its members the role; the top grant's mfa decides."""
    body = BASE + """
[groups]
ops = ["alice"]

[[grants]]
groups = ["ops"]
vms = ["web-*"]
role = "owner"
mfa = "totp"

[[grants]]
users = ["alice"]
vms = ["*"]
role = "reader"
"""
    config = load_config(write(tmp_path, body))
    assert config.role_for("alice", "web-01") is Role.OWNER
    assert config.mfa_for("alice", "web-01") == "totp"
    assert config.role_for("alice", "db-01") is Role.READER
    assert config.mfa_for("alice", "db-01") is None


def test_bad_mfa_value_is_refused(tmp_path: Path) -> None:
    """mfa accepts only "totp"."""
    body = BASE + '\n[[grants]]\nusers = ["alice"]\nvms = ["*"]\nrole = "owner"\nmfa = "sms"\n'
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=rf"{path}:14: grants.0.mfa: must be \"totp\""):
        load_config(path)


@pytest.mark.parametrize("option", ['from=""', 'from=","', 'from="10.0.0.0/8,"',
                                    'from="10.0.0.0/8,,!10.0.0.1"', 'from="!"', "from"])
def test_empty_from_pattern_is_refused(tmp_path: Path, option: str) -> None:
    """from= with an empty list or an empty pattern is a load error, not "any address"."""
    keys = tmp_path / "alice.keys"
    keys.write_text(f"{option} {KEY}\n")
    path = write(tmp_path, BASE.replace(f'keys = ["{KEY}"]', f'authorized_keys = "{keys}"'))
    with pytest.raises(ConfigError, match="from= needs a non-empty list"):
        load_config(path)


def test_from_matches_ipv4_mapped_ipv6_peer(tmp_path: Path) -> None:
    """A dual-stack peer ::ffff:a.b.c.d is matched as a.b.c.d against from=, negation included."""
    path = write(tmp_path, BASE.replace(f'"{KEY}"', f"'from=\"10.0.0.0/8,!10.9.9.9\" {KEY}'"))
    key = load_config(path).users["alice"].keys[0]
    assert key.allows_from("::ffff:10.1.2.3")
    assert not key.allows_from("::ffff:10.9.9.9")
    glob = write(tmp_path, BASE.replace(f'"{KEY}"', f"'from=\"192.168.1.*\" {KEY}'"))
    assert load_config(glob).users["alice"].keys[0].allows_from("::ffff:192.168.1.5")


def test_max_sessions_defaults_to_sshd_and_is_configurable(tmp_path: Path) -> None:
    """[ssh] max_sessions defaults to OpenSSH's 10, can be set, and must be at least 1."""
    assert load_config(write(tmp_path, BASE)).ssh.max_sessions == 10
    assert load_config(write(tmp_path, BASE + "[ssh]\nmax_sessions = 3\n")).ssh.max_sessions == 3
    with pytest.raises(ConfigError, match=r"ssh\.max_sessions"):
        load_config(write(tmp_path, BASE + "[ssh]\nmax_sessions = 0\n"))


def test_ring_sync_defaults_to_fdatasync_and_rejects_unknown(tmp_path: Path) -> None:
    """ring_sync is "fdatasync" unless "syncfs" is asked for; anything else names the key."""
    from serialmux.config import ConfigError, parse_config

    assert parse_config("[server]\n", tmp_path / "a.toml").server.ring_sync == "fdatasync"
    chosen = parse_config('[server]\nring_sync = "syncfs"\n', tmp_path / "b.toml")
    assert chosen.server.ring_sync == "syncfs"
    with pytest.raises(ConfigError, match=r"b\.toml:2: server\.ring_sync: must be one of"):
        parse_config('[server]\nring_sync = "fsync-always"\n', tmp_path / "b.toml")


def test_a_bad_defaults_value_is_reported_once_at_its_own_line(tmp_path: Path) -> None:
    """A bad [defaults] value is one error naming defaults.KEY and its line, not one error per
    VM naming each VM's table; a VM's own value is still blamed on the VM."""
    body = BASE.replace("[vms.web-01]", '[defaults]\nring_size = "10KiB"\nbaud = "fast"\n\n'
                        '[vms.web-01]') + '\n[vms.web-02]\nport = "pty:/dev/pts/98"\n' \
        '\n[vms.web-03]\nport = "pty:/dev/pts/97"\nbaud = "slow"\n'
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.count("defaults.ring_size") == 1
    assert f"{path}:5: defaults.ring_size:" in text
    assert f"{path}:6: defaults.baud: must be an integer, not str" in text
    assert "vms.web-01.ring_size" not in text
    assert "vms.web-02.baud" not in text
    assert "vms.web-03.baud: must be an integer, not str" in text
