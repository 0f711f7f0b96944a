"""``python -m openalign`` is the ``openalign`` command (handy under ``torchrun -m``)."""

import sys

from .cli import main

sys.exit(main())
