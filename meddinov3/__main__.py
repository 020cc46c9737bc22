"""`python -m meddinov3 VERB ...`: the `meddinov3` command (also the form for torchrun and the Slicer modules)."""

import sys

from .cli.main import main

sys.exit(main())
