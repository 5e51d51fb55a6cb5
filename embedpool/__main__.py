"""``python -m embedpool``: the command line (``embedpool.cli.main``), as the ``embedpool``
script runs it."""

from embedpool.cli import main

if __name__ == "__main__":
    main()
