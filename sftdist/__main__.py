"""``python -m sftdist COMMAND [args]``: the same as the ``sftdist`` command."""

from sftdist.cli import main

if __name__ == "__main__":
    main()
