"""`python -m meddinov3.cli VERB ...`: the `meddinov3` command, in the form torchrun and the Slicer modules run."""

import sys

from .main import main

sys.exit(main())
