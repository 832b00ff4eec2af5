"""``python -m flowalign ...``: the same command line as the ``flowalign`` script (``flowalign --help``)."""

from flowalign.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
