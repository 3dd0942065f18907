"""``python -m attnpass``: the same command line as the ``attnpass`` script."""

import sys

from attnpass.cli import main

if __name__ == "__main__":
    sys.exit(main())
