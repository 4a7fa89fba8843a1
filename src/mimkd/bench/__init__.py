"""``mimkd bench``'s library: what one training step costs, per method (docs/architecture.md).

:mod:`.build` builds a row (the student step, the teacher forward, a method's step) on synthetic batches,
:mod:`.timing` measures rows (in fresh processes on a CPU, for their memory) and :mod:`.report` writes the
table. The package sits above :mod:`mimkd.engine` (it times the trainer's own step); the command line is
:mod:`mimkd.cli.bench`.
"""
