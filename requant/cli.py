"""``requant``: the one command an operator types.

Exit codes (the same for every subcommand):
  0  done (including "nothing to do")
  1  refused: the gate did not pass, or a rollout was rolled back; nothing was promoted
  2  bad input: settings, arguments or files; the message names the field and the fix
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from requant.errors import GateFailed, RolloutFailed, SettingsError
from requant.settings import PipelineSettings, load_settings

EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT = 0, 1, 2


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="settings YAML (default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="override one setting (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="requant", description="Requantize a Hugging Face causal LM to W8A8, gate it, "
        "publish it and roll it out.", epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the pipeline (calibrate, quantize, evaluate, gate, "
                       "publish, roll out)")
    _settings_args(p)
    p = sub.add_parser("promote", help="roll a published revision or a checkpoint out, or "
                       "roll back")
    _settings_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--revision", help="published commit SHA on hub.repo_id")
    what.add_argument("--checkpoint", help="a local checkpoint folder (dry-run demo)")
    what.add_argument("--rollback", action="store_true", help="back to the previous revision")
    p.add_argument("--force", action="store_true", help="promote a revision or checkpoint the "
                   "gate did not pass (recorded as forced)")
    p = sub.add_parser("status", help="what serves where, and the last runs")
    _settings_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--runs", type=int, default=5, help="how many recent runs to show")
    p = sub.add_parser("down", help="stop the local deployment (router and vLLM servers)")
    _settings_args(p)
    runs = sub.add_parser("runs", help="manage run folders and caches")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p = runs_sub.add_parser("prune", help="delete old runs and cache entries; never what "
                            "serves or what was last published")
    _settings_args(p)
    p.add_argument("--keep", type=int, help="keep the newest N runs")
    p.add_argument("--older-than", help="delete runs (and cache entries) older than this, "
                   "e.g. 14d, 12h")
    p.add_argument("--dry-run", action="store_true", help="only list what would go")
    sub.add_parser("settings-schema", help="the JSON schema of the settings (YAML configs, "
                   "--set keys, the Prefect UI form)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = HANDLERS[args.command]
    try:
        return handler(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (GateFailed, RolloutFailed) as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_REFUSED


def _load(args: argparse.Namespace) -> PipelineSettings:
    return load_settings(args.config, args.overrides)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)  # bad settings end here, before Prefect or any model is loaded
    from requant.flows.requantize import requantize
    from requant.report import gate_line, publish_line, rollout_line

    summary = requantize(settings)
    if summary.get("no_op"):
        print(f"\nnothing to do: this candidate was already published "
              f"({summary['already_published']['run_id']}); --set force=true to redo it")
        return EXIT_OK
    print(f"\ncheckpoint: {summary['checkpoint']}\nrun directory: {summary['run_dir']}")
    print(gate_line(summary["gate"]).replace("- **gate**", "gate"))
    print(publish_line(summary["publish"]).replace("- **publish**", "publish"))
    print(rollout_line(summary["rollout"]).replace("- **rollout**", "rollout"))
    if summary["rollout"] and summary["rollout"].get("target") == "local":
        print("  stop the local deployment with: requant down")
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    settings = _load(args)
    from requant.flows.promote import promote

    result = promote(settings, args.revision, args.checkpoint, args.rollback, args.force)
    d = result["deployed"]
    print(f"\nserving {d['release']['revision']} at {d['endpoint']} "
          f"(model {settings.rollout.served_model_name}); "
          f"{'changed' if result['changed'] else 'already serving, nothing changed'}"
          f"{'; FORCED past the gate (recorded)' if result.get('forced') else ''}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from requant.status import collect_status, render_status

    status = collect_status(_load(args), recent=args.runs)
    print(json.dumps(status, indent=2, default=str) if args.json else render_status(status))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from requant.rollout.local import shutdown_local

    settings = _load(args)
    shutdown_local(settings)
    print(f"stopped the local deployment on port {settings.rollout.local.port} (its record in "
          f"{settings.rollout.state_dir} stays)")
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    from requant.runs import delete, parse_age, prune_candidates

    age = parse_age(args.older_than) if args.older_than else None
    doomed = prune_candidates(_load(args), args.keep, age)
    for path in doomed:
        print(f"{'would delete' if args.dry_run else 'deleting'} {path}")
    if not args.dry_run:
        delete(doomed)
    print(f"{len(doomed)} folder(s) {'to delete' if args.dry_run else 'deleted'}")
    return EXIT_OK


def cmd_settings_schema(args: argparse.Namespace) -> int:
    print(json.dumps(PipelineSettings.model_json_schema(), indent=2))
    return EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "promote": cmd_promote, "status": cmd_status, "down": cmd_down,
    "runs": cmd_runs, "settings-schema": cmd_settings_schema,
}


if __name__ == "__main__":
    sys.exit(main())
