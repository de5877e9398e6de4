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
    type=click.Path(dir_okay=False), help="The TOML configuration file.")


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
    """Validate a configuration file; errors name file, line and key."""
    config = _load(path or config_path)
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
        run(lambda: Daemon(config).serve())
    except SerialmuxError as exc:
        click.echo(f"serialmux: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"serialmux: cannot start: {exc}", err=True)
        sys.exit(1)


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


@main.command()
@click.argument("vm")
@config_option
@click.option("-n", "--lines", default=200, show_default=True, help="Lines of output to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output (like tail -f).")
@click.option("--since", help="Start at a time: '10 min ago', '2h ago', ISO 8601, 'HH:MM'.")
@click.option("--boot", is_flag=True, help="Start at the last VM start/reset marker.")
@click.option("--timestamps", is_flag=True, help="Prefix each line with its UTC time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@click.option("--raw", is_flag=True, help="Byte-exact guest output, no decoration.")
def logs(vm: str, config_path: str, lines: int, follow: bool, since: str | None, boot: bool,
         timestamps: bool, as_json: bool, raw: bool) -> None:
    """Print a VM's scrollback, read from its ring file (daemon running or not)."""
    from . import logs as logs_mod

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
            when = logs_mod.parse_since(since, datetime.now(UTC))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    out = sys.stdout.buffer
    try:
        cursor = logs_mod.write_logs(Path(path), out, lines=None if (since or boot) else lines,
                                     since=when, boot=boot, timestamps=timestamps,
                                     as_json=as_json, raw=raw)
        out.flush()
        if follow:
            logs_mod.follow_logs(Path(path), out, cursor, timestamps=timestamps,
                                 as_json=as_json, raw=raw)
    except FileNotFoundError:
        click.echo(f"serialmux: no ring for {vm!r} at {path} (has the daemon run?)", err=True)
        sys.exit(1)
    except SerialmuxError as exc:
        click.echo(f"serialmux: {exc}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
