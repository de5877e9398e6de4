"""The ``serialmux`` command line: the only place that prints for people or exits.

Each command gathers options, loads the config and hands over to a
coroutine or a library function (uvicorn's ``main`` → ``Server.serve()``).
"""

from __future__ import annotations

import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from . import __version__
from .config import Config, check_name, load_config
from .errors import ConfigError, SerialmuxError

DEFAULT_CONFIG = "/etc/serialmux/serialmux.toml"

config_option = click.option(
    "--config", "-c", "config_path", default=DEFAULT_CONFIG, show_default=True,
    type=click.Path(dir_okay=False),
    help="The TOML configuration file (commands that talk to the daemon find its control "
         "socket from its server.runtime_dir); one that cannot be read is an error, exit 1.")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"serialmux: configuration error:\n{exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="serialmux")
def main() -> None:
    """serialmux: every VM's serial console over SSH, one writer at a time."""


@main.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@config_option
def check_config(path: str | None, config_path: str) -> None:
    """Validate a configuration file (and its [ssh] revoked_keys file); errors name file,
    line and key."""
    from .auth import Revocations

    config = _load(path or config_path)
    revoked = Revocations(config.ssh.revoked_keys)
    if revoked.error:
        click.echo(f"serialmux: [ssh] revoked_keys is unusable, so every key and certificate "
                   f"would be refused: {revoked.error}", err=True)
        sys.exit(1)
    click.echo(f"{config.path}: OK ({len(config.vms)} VMs, {len(config.users)} users, "
               f"{len(config.grants)} grants)")


@main.command()
@config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config_path: str, log_level: str) -> None:
    """Run the daemon (as systemd's Type=notify service does)."""
    from . import log
    from .daemon import Daemon, run

    config = _load(config_path)
    log.configure(log_level)
    try:
        run(lambda: Daemon(config, freeze_heap=True).serve())
    except (SerialmuxError, OSError, BaseExceptionGroup) as exc:
        # Start-up failures arrive wrapped in the daemon's TaskGroup: say each, no traceback.
        leaves = _leaves(exc)
        if not all(isinstance(e, SerialmuxError | OSError) for e in leaves):
            raise
        for error in leaves:
            cause = "" if isinstance(error, SerialmuxError) else "cannot start: "
            click.echo(f"serialmux: {cause}{error}", err=True)
        sys.exit(1)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside *exc*, exception groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


@main.command()
@click.option("--port", default=2222, show_default=True,
              help="Port on 127.0.0.1 (a free one is taken if busy).")
def demo(port: int) -> None:
    """Try serialmux with a simulated VM: no VM, no config, prints the ssh line."""
    from . import log
    from .daemon import run
    from .demo import run_demo

    log.configure("warning")
    with contextlib.suppress(KeyboardInterrupt):
        run(lambda: run_demo(port, announce=lambda text: click.echo(text)))


@main.command("libvirt-hook")
@click.argument("domain")
@click.argument("operation")
@click.argument("rest", nargs=-1)
@click.option("--config", "-c", "config_path", default=DEFAULT_CONFIG, show_default=True,
              help="The TOML configuration file.")
def libvirt_hook(domain: str, operation: str, rest: tuple[str, ...], config_path: str) -> None:
    """Keep a libvirt domain's COM1 linked in [discovery] dir (run by libvirt's qemu hook,
    config/libvirt-hook, with the domain XML on stdin). It exits 0 whatever happens: a
    failing hook keeps a domain from starting."""
    from . import libvirthook

    # Read all of stdin whatever the operation: libvirt writes the XML to every hook.
    xml = sys.stdin.buffer.read(libvirthook.MAX_XML)
    try:
        config = load_config(config_path)
        if config.discovery is None:
            raise libvirthook.HookProblem(f"{config_path} has no [discovery] dir: nothing linked")
        done = libvirthook.run(config.discovery.dir, domain, operation, xml)
    except (ConfigError, libvirthook.HookProblem) as exc:
        message, problem = f"{domain} {operation}: {exc}", True
    except Exception as exc:  # whatever it is, the domain must still start
        message, problem = f"{domain} {operation}: {type(exc).__name__}: {exc}", True
    else:
        if done is None:
            return
        message, problem = f"{domain} {operation}: {done}", False
    libvirthook.to_syslog(message, problem=problem)
    click.echo(f"serialmux libvirt-hook: {message}", err=True)


@main.command()
@click.argument("vm")
@config_option
@click.option("-n", "--lines", default=200, show_default=True, type=click.IntRange(min=0),
              help="Lines of output to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output (like tail -f).")
@click.option("--since", help="Start at a time: '10 min ago', '2h ago', ISO 8601, 'HH:MM'.")
@click.option("--boot", is_flag=True, help="Start at the last VM start/reset marker.")
@click.option("--timestamps", is_flag=True, help="Prefix each line with its UTC time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@click.option("--raw", is_flag=True, help="Byte-exact guest output, no decoration.")
def logs(vm: str, config_path: str, lines: int, follow: bool, since: str | None, boot: bool,
         timestamps: bool, as_json: bool, raw: bool) -> None:
    """Print a VM's scrollback, read from its ring file (daemon running or not)."""
    from .logs import logs_chunks, parse_since, print_logs

    if not check_name(vm):
        raise click.BadParameter("not a valid VM name", param_hint="VM")
    config = _load(config_path)
    path = config.server.state_dir / "rings" / f"{vm}.ring"
    if vm not in config.vms and not path.exists():
        click.echo(f"serialmux: no VM {vm!r} in {config.path} and no ring at {path}", err=True)
        sys.exit(1)
    when = None
    if since:
        try:
            when = parse_since(since, datetime.now(UTC))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    out = sys.stdout.buffer
    try:
        print_logs(logs_chunks(Path(path), lines=None if (since or boot) else lines, since=when,
                               boot=boot, timestamps=timestamps, as_json=as_json, raw=raw,
                               follow=follow), out)
    except FileNotFoundError:
        click.echo(f"serialmux: no ring for {vm!r} at {path} (has the daemon run?)", err=True)
        sys.exit(1)
    except SerialmuxError as exc:
        click.echo(f"serialmux: {exc}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, BrokenPipeError):
        pass


# -- local control (the daemon's control socket; root or the serialmux group) ----------


def _runtime_dir(config_path: str) -> Path:
    """server.runtime_dir of the config: where the daemon's control socket is.

    A config that cannot be read, or has errors, is reported as check-config
    reports it (file, line, key) and the command exits 1: guessing a directory
    (the default one) could reach, and reload, another daemon.
    """
    try:
        return load_config(config_path).server.runtime_dir
    except ConfigError as exc:
        click.echo(f"serialmux: configuration error:\n{exc}\n(the daemon's control socket is "
                   "in its server.runtime_dir, read from this file: fix the file, or name the "
                   "daemon's own with --config)", err=True)
        sys.exit(1)


def _control(config_path: str, payload: dict[str, object]) -> dict[str, object]:
    from . import controlclient

    try:
        return controlclient.request(_runtime_dir(config_path), payload)
    except SerialmuxError as exc:
        click.echo(f"serialmux: {exc}", err=True)
        sys.exit(1)


def _vm_arg(vm: str | None) -> str | None:
    if vm is not None and not check_name(vm):
        raise click.BadParameter("not a valid VM name", param_hint="VM")
    return vm


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: str, as_json: bool) -> None:
    """Show each VM (port, writer, watchers, bytes, ring) and each listener."""
    import json

    from .controlclient import render_status

    report = _control(config_path, {"cmd": "status"})["status"]
    assert isinstance(report, dict)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in render_status(report):
            click.echo(line)


@main.command()
@click.argument("vm")
@config_option
def who(vm: str, config_path: str) -> None:
    """Who is attached to VM: the writer and the watchers."""
    lines = _control(config_path, {"cmd": "who", "vm": _vm_arg(vm)})["lines"]
    assert isinstance(lines, list)
    for line in lines:
        click.echo(line)


@main.command()
@click.argument("vm")
@config_option
@click.option("--user", help="Disconnect every session of this user (default: the writer).")
def kick(vm: str, config_path: str, user: str | None) -> None:
    """Disconnect VM's writer, or every session of --user."""
    click.echo(_control(config_path, {"cmd": "kick", "vm": _vm_arg(vm), "user": user})["result"])


def _action_command(name: str, doc: str) -> None:
    @main.command(name, help=doc)
    @click.argument("vm")
    @config_option
    def command(vm: str, config_path: str) -> None:
        click.echo(_control(config_path, {"cmd": name, "vm": _vm_arg(vm)})["result"])


@main.command()
@click.argument("vm")
@config_option
def reopen(vm: str, config_path: str) -> None:
    """Open VM's port again now; a pty: path whose number was reused (the VM restarted and
    got its number back) is attached: say so only when the PTY there is VM's."""
    click.echo(_control(config_path, {"cmd": "reopen", "vm": _vm_arg(vm)})["result"])


_action_command("break", "Send a serial BREAK to VM.")
_action_command("nmi", "Inject an NMI into VM (needs qmp).")
_action_command("reset", "Hard-reset VM (needs qmp).")


@main.command()
@click.argument("vm")
@click.argument("key")
@config_option
def sysrq(vm: str, key: str, config_path: str) -> None:
    """Send Magic SysRq KEY (0-9, a-z) to VM."""
    click.echo(_control(config_path, {"cmd": "sysrq", "vm": _vm_arg(vm), "arg": key})["result"])


@main.command()
@click.argument("vm", required=False)
@config_option
@click.option("--reason", default="", help="Shown to whoever tries to attach.")
def disable(vm: str | None, config_path: str, reason: str) -> None:
    """Refuse attaching to VM (or to every VM) and close its sessions."""
    click.echo(_control(config_path, {"cmd": "disable", "vm": _vm_arg(vm),
                                      "reason": reason})["result"])


@main.command()
@click.argument("vm", required=False)
@config_option
def enable(vm: str | None, config_path: str) -> None:
    """Allow attaching to VM (or to every VM) again; clears a gone VM's disabled entry too."""
    click.echo(_control(config_path, {"cmd": "enable", "vm": _vm_arg(vm)})["result"])


@main.command()
@config_option
def reload(config_path: str) -> None:
    """Re-read the configuration (like systemctl reload); errors keep the running one.

    \b
    Exit status:
      0  every change applied
      1  the configuration has errors (nothing applied), the daemon cannot be
         reached, or a change was not applied: SSH listeners kept as they were
         (e.g. an address in use), or a setting that needs a restart; or the
         reload applied but found a problem ([ssh] revoked_keys unusable: every
         key is refused); each is named on stderr
    """
    reply = _control(config_path, {"cmd": "reload", "path": str(Path(config_path).absolute())})
    click.echo(reply["result"])
    left = []
    if reply.get("listeners_kept"):
        left.append(f"the SSH listeners were kept as they were: {reply['listeners_kept']}; "
                    "fix that and reload again")
    restart = reply.get("restart_needed")
    for setting in restart if isinstance(restart, list) else []:
        left.append(f"{setting} changed: it takes effect when serialmux restarts "
                    "(systemctl restart serialmux)")
    for text in left:
        click.echo(f"serialmux: not applied: {text}", err=True)
    problems = reply.get("problems")
    for text in problems if isinstance(problems, list) else []:
        click.echo(f"serialmux: problem: {text}", err=True)
    if left or problems:
        sys.exit(1)


@main.command()
@click.argument("vm")
@config_option
@click.option("--ro", is_flag=True, help="Watch only.")
@click.option("--safe", is_flag=True, help="Do not take over; refuse if someone is typing.")
@click.option("--replay", default=20, show_default=True, help="Lines of scrollback first.")
def attach(vm: str, config_path: str, ro: bool, safe: bool, replay: int) -> None:
    """The VM's console on this terminal (Ctrl-] . leaves, Ctrl-] ? lists escapes)."""
    from . import controlclient

    try:
        controlclient.attach(_runtime_dir(config_path),
                             {"vm": _vm_arg(vm), "ro": ro, "safe": safe, "replay": replay},
                             sys.stdin.fileno(), sys.stdout.fileno())
    except SerialmuxError as exc:
        click.echo(f"serialmux: {exc}", err=True)
        sys.exit(1)


@main.command("totp-enroll")
@click.argument("user")
@config_option
def totp_enroll(user: str, config_path: str) -> None:
    """Create USER's TOTP secret (0600 under state_dir/totp) and print its otpauth:// URI once."""
    from .mfa import TotpStore

    config = _load(config_path)
    if user not in config.users:
        click.echo(f"serialmux: {user!r} is not a user in {config.path}", err=True)
        sys.exit(1)
    uri = TotpStore(config.server.state_dir).enroll(user)
    click.echo(f"TOTP secret for {user} written; add it to an authenticator app (shown once):")
    click.echo(uri)
