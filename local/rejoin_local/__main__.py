"""``python -m rejoin_local``: the whole stack on this machine (see :mod:`rejoin_local.stack`)."""

from __future__ import annotations

import sys

from .stack import main

if __name__ == "__main__":
    sys.exit(main())
