"""Imported by Python at start-up when this folder is on PYTHONPATH (tests/test_reliability.py): the disk
reports 1 MiB free, so the real CLI's pre-flight check meets a full disk without filling a real one."""

import shutil

_real_disk_usage = shutil.disk_usage


def _full_disk_usage(path):
    u = _real_disk_usage(path)
    return type(u)(u.total, u.total - (1 << 20), 1 << 20)


shutil.disk_usage = _full_disk_usage
