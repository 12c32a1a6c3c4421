"""`python -m hd_sdk`."""

import sys

from .cli import main

sys.exit(main())
