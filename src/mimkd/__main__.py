"""``python -m mimkd`` (also what ``torchrun -m mimkd`` runs)."""

import sys

from mimkd.cli import main

sys.exit(main())
