"""`python -m service serve ...`, the same as `gradserve serve ...`."""

import sys

from service.cli import main

sys.exit(main())
