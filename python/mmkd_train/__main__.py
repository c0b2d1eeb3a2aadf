"""``python -m mmkd_train``: the same as the ``mmkd-train`` command."""

import sys

from .cli import main

sys.exit(main())
