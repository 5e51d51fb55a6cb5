"""python -m embedpool: the CLI."""

from embedpool.cli import main

if __name__ == "__main__":
    main()
