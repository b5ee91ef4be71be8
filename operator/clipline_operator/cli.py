"""``clipline-operator``: run the operator, simulate the autoscaler, print manifests.

* ``clipline-operator run [--namespace NS] [--liveness URL] [--standalone]``: the kopf
  operator (cluster-wide unless ``--namespace``); same as
  ``kopf run -m clipline_operator.handlers --all-namespaces``.
* ``clipline-operator simulate [--scenario default|multi-gpu] [--png PATH | --no-png]
  [--json]``: the closed-loop simulation; writes the PNG (default ``docs/autoscaler.png``,
  ``docs/autoscaler-multigpu.png`` for ``multi-gpu``) and prints the summary.
* ``clipline-operator crd [--write] [--peering]``: the ClipPipeline CRD as YAML (with
  ``--write`` into the chart), or kopf's peering CRDs.
* ``clipline-operator rbac``: the ClusterRole the operator needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _cmd_run(args: argparse.Namespace) -> int:
    import kopf

    from clipline_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose)
    # kopf names this replica in the peering object after POD_ID; accept the usual
    # downward-API POD_NAME too.
    if os.environ.get("POD_NAME") and not os.environ.get("POD_ID"):
        os.environ["POD_ID"] = os.environ["POD_NAME"]
    namespaces = args.namespace or []
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness,
        standalone=True if args.standalone else None,
    )
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from clipline_operator import simulate

    default_png = "autoscaler.png" if args.scenario == "default" else "autoscaler-multigpu.png"
    png: Path | None = Path(args.png) if args.png else _repo_root() / "docs" / default_png
    if args.no_png:
        png = None
    summary, _ = simulate.run_default(png=png, scenario=simulate.SCENARIOS[args.scenario]())
    shown = png
    if png is not None and png.resolve().is_relative_to(_repo_root()):
        shown = png.resolve().relative_to(_repo_root())
    summary["png"] = str(shown) if shown is not None else None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for node, s in summary["nodes"].items():
            print(
                f"{node}: settled at period {s['settled_period']}, utilization after "
                f"{s['utilization_after_settle']}, {s['changes_after_settle']} change(s) in "
                f"{s['periods_after_settle']} periods, {s['workers_after_idle']} worker(s) "
                f"after idle (min {s['min_workers']})"
            )
        if shown is not None:
            print(f"picture: {shown}")
    return 0


def _cmd_crd(args: argparse.Namespace) -> int:
    from clipline_operator import crd

    if args.peering:
        sys.stdout.write(yaml.safe_dump_all(crd.build_peering_crds(), sort_keys=False))
        return 0
    text = crd.crd_yaml()
    if args.write:
        path = crd.chart_crd_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_rbac(args: argparse.Namespace) -> int:
    from clipline_operator import rbac

    sys.stdout.write(yaml.safe_dump(rbac.cluster_role(), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipline-operator", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the kopf operator")
    run.add_argument("--namespace", "-n", action="append", help="watch only these namespaces")
    run.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--standalone", action="store_true", help="no peering (development)")
    run.add_argument("--verbose", "-v", action="store_true")
    run.set_defaults(func=_cmd_run)
    sim = sub.add_parser("simulate", help="closed-loop autoscaler simulation")
    sim.add_argument(
        "--scenario",
        choices=("default", "multi-gpu"),
        default="default",
        help="two one-GPU nodes (default) or a four-GPU node with a slow GPU beside one",
    )
    sim.add_argument("--png", default=None, help="where to write the picture")
    sim.add_argument("--json", action="store_true", help="print the JSON summary")
    sim.add_argument("--no-png", action="store_true", help="skip the picture")
    sim.set_defaults(func=_cmd_simulate)
    crd = sub.add_parser("crd", help="print the ClipPipeline CRD")
    crd.add_argument("--write", action="store_true", help="write it into charts/clipline/crds")
    crd.add_argument("--peering", action="store_true", help="print kopf's peering CRDs instead")
    crd.set_defaults(func=_cmd_crd)
    rb = sub.add_parser("rbac", help="print the operator's ClusterRole")
    rb.set_defaults(func=_cmd_rbac)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
