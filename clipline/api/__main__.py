"""Small operator tools for the API: ``python -m clipline.api COMMAND``.

* ``new-key ID [--scopes submit+read+cancel]``: print a fresh API key (give it to the
  backend) and the entry to put into ``CLIPLINE_API_KEYS`` (only the hash);
* ``hash-key ID``: read a key on stdin, print its configuration entry;
* ``openapi``: print the OpenAPI document (``docs/openapi.json`` is this output);
  ``openapi --check FILE`` prints how FILE differs from it (:func:`openapi_diff`) and
  exits 1 when it does, so an undocumented change to the API fails CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clipline.api.auth import SCOPES, entry, new_key


def openapi_document() -> dict[str, object]:
    """The OpenAPI document of the API (independent of any running server)."""
    from clipline.api.app import create_app
    from clipline_core.settings import Settings

    app = create_app(Settings(api_keys="doc:" + "0" * 64, deployment="openapi"))
    return app.openapi()


def openapi_diff(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Every place where document ``actual`` differs from ``expected`` (empty: equal).

    Each entry names the JSON path (``paths./v1/jobs.get.responses.200``) and whether
    something was added, removed or changed there.
    """
    here = where or "(document)"
    if isinstance(expected, dict) and isinstance(actual, dict):
        out: list[str] = []
        for name in sorted(set(expected) | set(actual), key=str):
            path = f"{where}.{name}" if where else str(name)
            if name not in actual:
                out.append(f"{path}: removed")
            elif name not in expected:
                out.append(f"{path}: added")
            else:
                out += openapi_diff(expected[name], actual[name], path)
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        out = []
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            out += openapi_diff(a, b, f"{where}[{i}]")
        return out
    if expected != actual or type(expected) is not type(actual):
        return [f"{here}: changed from {json.dumps(expected)[:120]} to {json.dumps(actual)[:120]}"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipline.api")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("new-key", help="make a new API key and its configuration entry")
    p.add_argument("key_id")
    p.add_argument("--scopes", default="+".join(sorted(SCOPES)))
    p = sub.add_parser("hash-key", help="configuration entry for a key read from stdin")
    p.add_argument("key_id")
    p.add_argument("--scopes", default="+".join(sorted(SCOPES)))
    p = sub.add_parser("openapi", help="print the OpenAPI document")
    p.add_argument("--check", metavar="FILE", help="compare FILE with it instead; 1 if they differ")
    args = parser.parse_args(argv)

    if args.command == "openapi":
        document = openapi_document()
        if args.check:
            diff = openapi_diff(json.loads(Path(args.check).read_text()), document)
            for line in diff:
                print(line)
            if diff:
                print(
                    f"{args.check} is not the API's document: regenerate it with "
                    "`python -m clipline.api openapi`",
                    file=sys.stderr,
                )
            return 1 if diff else 0
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        return 0
    scopes = frozenset(s for s in args.scopes.split("+") if s)
    if not scopes or scopes - SCOPES:
        print(f"scopes must be a +-list of {', '.join(sorted(SCOPES))}", file=sys.stderr)
        return 2
    if args.command == "new-key":
        key = new_key()
        print(f"key:   {key}")
        print(f"entry: {entry(args.key_id, key, scopes)}")
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        print("no key on stdin", file=sys.stderr)
        return 2
    print(entry(args.key_id, key, scopes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
