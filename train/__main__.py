"""`python -m dynprune.train ...` (same as `dynprune train ...`; what torchrun launches)."""

import sys

from dynprune.train.cli import main

sys.exit(main())
