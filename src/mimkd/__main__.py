"""``python -m mimkd`` (also what ``torchrun -m mimkd`` runs)."""

from mimkd.cli import entry

entry()
