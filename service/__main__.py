"""``python -m service`` is ``streamlearn``."""

import sys

from service.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports it
    sys.exit(main())
