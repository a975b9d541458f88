"""`python -m daemon` is `edgellm`."""

import sys

from daemon.cli import main

sys.exit(main())
