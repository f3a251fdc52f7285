"""`python -m fastkd`: see fastkd/cli/."""
import sys

from fastkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
