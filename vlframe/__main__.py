"""``python -m vlframe``: the ``vlframe`` command (as torchrun starts it: ``-m vlframe train ...``)."""

import sys

from vlframe.cli import main

sys.exit(main())
