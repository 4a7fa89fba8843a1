"""``python -m mimkd`` (also what ``torchrun -m mimkd`` runs).

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``) unless the environment sets ``OMP_WAIT_POLICY``
or ``GOMP_SPINCOUNT``: :func:`mimkd.cli.set_openmp_wait_policy`. It must happen before torch (and its OpenMP
runtime) is loaded, hence here as well as in the console script's :func:`mimkd.cli.entry`.
"""

from mimkd.cli import entry, set_openmp_wait_policy

set_openmp_wait_policy()
entry()
