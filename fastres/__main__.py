"""`python -m fastres ...`: the command line (see fastres.cli)."""
from fastres.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
