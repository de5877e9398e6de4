"""``python -m serialmux``: the same as the ``serialmux`` command."""

from .cli import main

main()
