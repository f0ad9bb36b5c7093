#!/usr/bin/env python
"""List or remove scimtrain's training caches.

    python bin/scimtrain_cache.py [--cache_dir DIR] list
    python bin/scimtrain_cache.py [--cache_dir DIR] remove [--older-than DAYS] [--key K] [--all]

Caches live in ``$SCIMTRAIN_CACHE/training-cache`` or ``~/.cache/scimtrain/training-cache``
unless ``--cache_dir`` says otherwise (the same folder given to training).
"""

from __future__ import annotations

import argparse
import sys

from scimtrain.cache import default_cache_dir, list_caches, remove_caches


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default=None,
                        help=f"folder of the caches (default: {default_cache_dir()})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="show the caches, most recently used first")
    remove = commands.add_parser("remove", help="remove caches")
    remove.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                        help="only caches last used more than DAYS days ago")
    remove.add_argument("--key", default=None, help="only the cache whose key starts so")
    remove.add_argument("--all", action="store_true", help="every cache (with no filter)")
    args = parser.parse_args(argv)
    if args.command == "remove" and args.older_than is None and args.key is None \
            and not args.all:
        parser.error("say which caches to remove: --older-than DAYS, --key K, or --all")
    return args


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "list":
        caches = list_caches(args.cache_dir)
        if not caches:
            print(f"no training caches in {args.cache_dir or default_cache_dir()}")
        for entry in caches:
            print(f"{entry['key'][:16]}  {size(entry['size']):>9}  rows {entry['n_rows']}  "
                  f"genes {entry['n_genes']}  last used {entry['last_used']}  "
                  f"created {entry['created']}  {entry['status']}\n"
                  f"    {entry['path']}  (store {entry['store']})")
        return 0
    try:
        removed = remove_caches(args.cache_dir, older_than_days=args.older_than, key=args.key)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    for path in removed:
        print(f"removed {path}")
    print(f"removed {len(removed)} cache folder(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
