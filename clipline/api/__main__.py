"""Small operator tools for the API: ``python -m clipline.api COMMAND``.

* ``new-key ID [--scopes submit+read+cancel]``: print a fresh API key (give it to the
  backend) and the entry to put into ``CLIPLINE_API_KEYS`` (only the hash);
* ``hash-key ID``: read a key on stdin, print its configuration entry;
* ``openapi``: print the OpenAPI document (``docs/openapi.json`` is this output).
"""

from __future__ import annotations

import argparse
import json
import sys

from clipline.api.auth import SCOPES, entry, new_key


def openapi_document() -> dict[str, object]:
    """The OpenAPI document of the API (independent of any running server)."""
    from clipline.api.app import create_app
    from clipline_core.settings import Settings

    app = create_app(Settings(api_keys="doc:" + "0" * 64, deployment="openapi"))
    return app.openapi()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipline.api")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("new-key", help="make a new API key and its configuration entry")
    p.add_argument("key_id")
    p.add_argument("--scopes", default="+".join(sorted(SCOPES)))
    p = sub.add_parser("hash-key", help="configuration entry for a key read from stdin")
    p.add_argument("key_id")
    p.add_argument("--scopes", default="+".join(sorted(SCOPES)))
    sub.add_parser("openapi", help="print the OpenAPI document")
    args = parser.parse_args(argv)

    if args.command == "openapi":
        sys.stdout.write(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")
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
