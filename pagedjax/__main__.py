"""``python -m pagedjax <command>``: the same as the ``pagedjax`` console script, for environments
where the script is not on PATH."""
from pagedjax.entrypoints.cli import main

if __name__ == "__main__":
    main()
