"""`python -m fastres ...`: the command line (see fastres.tools.cli)."""
from fastres.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
