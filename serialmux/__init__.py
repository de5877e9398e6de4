"""serialmux: a serial-console gateway serving every VM's COM1 over SSH, one writer at a time."""

__version__ = "0.1.0"
