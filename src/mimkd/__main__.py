"""``python -m mimkd`` (also what ``torchrun -m mimkd`` runs).

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``) unless the environment says otherwise: with the
default spinning wait, a 2-thread training step on a 2-core machine shared with other jobs ran 16x slower
than with passive waiting (which matched 1 thread); see ``results/engine_options_cpu.md``. It must be set
before torch (and its OpenMP runtime) is loaded, hence here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mimkd.cli import entry  # noqa: E402

entry()
