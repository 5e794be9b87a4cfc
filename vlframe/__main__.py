import sys

from vlframe.cli import main

sys.exit(main())
