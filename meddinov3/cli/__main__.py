"""`python -m meddinov3.cli VERB ...`: the `meddinov3` command (as `python -m meddinov3`)."""

import sys

from .main import main

sys.exit(main())
