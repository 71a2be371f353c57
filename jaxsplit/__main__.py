"""``python -m jaxsplit``: the ``jaxsplit`` command."""

from jaxsplit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
