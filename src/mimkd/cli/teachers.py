"""``mimkd teachers list | fetch NAME... | verify``: published teachers and their cache (docs/teachers.md)."""

from __future__ import annotations

import argparse
import json

from mimkd.errors import MimkdError

__all__ = ["register"]


def _size(t) -> str:
    if t.path.is_file():
        return f"{t.path.stat().st_size / 1e6:.1f} MB"
    return f"{t.size_mb:.1f} MB" if t.size_mb else "-"


def _list(a: argparse.Namespace) -> int:
    from mimkd.teachers import cache_root, cache_state, load_catalogue

    cat = load_catalogue()
    rows = [
        {
            "name": t.name,
            "arch": t.arch,
            "dataset": t.dataset,
            "top1": t.top1,
            "size": _size(t),
            "cached": cache_state(t),
            "path": str(t.path),
            "url": t.url,
        }
        for t in cat.teachers.values()
    ]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    keys = ("name", "arch", "dataset", "top1", "size", "cached")
    table = [("NAME", "ARCHITECTURE", "DATASET", "TOP-1", "SIZE", "CACHED")]
    table += [tuple("-" if r[k] is None else str(r[k]) for k in keys) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\ncache: {cache_root()} (MIMKD_HOME); top-1: published, on the dataset's test set")
    print("fetch with `mimkd teachers fetch NAME`, or use `--teacher NAME` directly (fetched when missing)")
    return 0


def _fetch(a: argparse.Namespace) -> int:
    from mimkd.teachers import fetch, load_catalogue

    cat = load_catalogue()
    names = list(cat.teachers) if a.all else a.names
    if not names:
        raise MimkdError(
            "mimkd teachers fetch: name one or more teachers (mimkd teachers list), or pass --all"
        )
    wanted = [cat.get(n) for n in names]  # every name checked before anything is downloaded
    for t in wanted:
        path = fetch(t, cat, progress=a.progress)
        print(f"{t.name}: {path}")
    return 0


def _verify(a: argparse.Namespace) -> int:
    from mimkd.teachers import load_catalogue, verify

    checks = verify(load_catalogue())
    width = max(len(c.name) for c in checks)
    for c in checks:
        where = f"  {c.path}" if c.status != "not cached" else ""
        print(f"{c.status:<10}  {c.name:<{width}}  {c.detail}{where}".rstrip())
    bad = [c for c in checks if c.status == "MISMATCH"]
    if bad:
        print(f"{len(bad)} file(s) do not match: delete them and fetch again (mimkd teachers fetch NAME)")
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    t = sub.add_parser(
        "teachers",
        help="published teachers by name: list, fetch into the cache, verify",
        description="The teacher catalogue (repdistiller:*, torchvision:*; docs/teachers.md). Files are "
        "cached under $MIMKD_HOME/pretrained (default ~/.cache/mimkd/pretrained); MIMKD_TEACHERS_URL sets a "
        "mirror.",
    )
    tsub = t.add_subparsers(dest="action", required=True)
    ls = tsub.add_parser("list", help="the catalogue, with what is cached")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(fn=_list)
    f = tsub.add_parser("fetch", help="download, check and unpack teachers into the cache")
    f.add_argument(
        "names", nargs="*", metavar="NAME", help="e.g. repdistiller:resnet32x4 torchvision:resnet34"
    )
    f.add_argument("--all", action="store_true", help="every teacher of the catalogue")
    f.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show the progress bar"
    )
    f.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no bar (default: on a terminal only)"
    )
    f.set_defaults(fn=_fetch)
    v = tsub.add_parser("verify", help="re-hash the cached teachers against the catalogue and the manifest")
    v.set_defaults(fn=_verify)
