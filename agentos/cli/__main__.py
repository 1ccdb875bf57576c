"""``python -m agentos.cli``: the same as the ``agentos`` console script."""

from agentos.cli import main

if __name__ == "__main__":
    main()
