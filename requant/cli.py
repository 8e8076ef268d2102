"""``requant``: the one command an operator types.

Exit codes (the same for every subcommand):
  0  done (including "nothing to do")
  1  refused: the gate did not pass, or a rollout was rolled back; nothing was promoted
  2  bad input: settings, arguments or files; the message names the field and the fix
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from requant.alerts import HEARTBEAT_S
from requant.errors import EXIT_OK, SettingsError, explain
from requant.prefect_api import choose_api
from requant.settings import PipelineSettings

if TYPE_CHECKING:
    from requant.profile import OperatorProfile
    from requant.run_request import RunRequest


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="the operator's profile: a settings YAML "
                   "(default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="one field of the run request "
                   "(repeatable; `requant settings-schema --run` lists them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="requant", description="Requantize a Hugging Face causal LM to W8A8, gate it, "
        "publish it and roll it out.", epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (otherwise one line says what "
                        "failed and the fix)")
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
    p = sub.add_parser("noise", help="measure the baseline's noise (A/A: the source evaluated "
                       "twice as the gate evaluates it); later runs' gate records carry it")
    _settings_args(p)
    p.add_argument("--stages", type=int, default=1, help="the gate's stages to answer twice")
    p = sub.add_parser("settings-schema", help="the JSON schema of a profile's settings (the "
                       "YAML configs), or with --run of a run request (--set keys, the Prefect "
                       "UI form)")
    p.add_argument("--run", action="store_true", help="the run request's schema")
    sub.add_parser("automations", help="create or replace the automations that mark silent "
                   "runs Crashed and tell the team (REQUANT_NOTIFY_WEBHOOK_URL) about failed runs "
                   "and gates; make prefect-apply runs it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = HANDLERS[args.command]
    # before Prefect reads its settings: runs started here send heartbeats as often as the
    # workers' runs do, so the silent-run automation marks them Crashed as quickly
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    if args.command in ("run", "promote", "noise"):  # the commands that run flows
        # the project's server when it is up, chosen before Prefect is imported
        args.prefect_api = choose_api()
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code, message = explain(exc)
        if args.debug or code is None:
            raise
        print(f"\nerror: {message}", file=sys.stderr)
        print("  (run with --debug for the traceback)", file=sys.stderr)
        return code


def _console_without_tracebacks(args: argparse.Namespace) -> None:
    """A failed run ends in this command's one line; Prefect also logs the exception, and on
    the terminal that would be a traceback. Its console handlers print the message without it
    (the run's logs on the Prefect server keep the traceback; --debug shows it here too).
    Called once the input is checked: a refusal costs no Prefect import (2 s)."""
    if args.debug:
        return
    import prefect.main  # noqa: F401 - configures Prefect's logging, whose handlers are wrapped here

    for name in ["", *logging.root.manager.loggerDict]:
        logger = logging.getLogger(name)
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) \
                    and not getattr(handler, "_requant_quiet", False):
                handler.format = _without_traceback(handler.format)  # type: ignore[method-assign]
                handler._requant_quiet = True  # type: ignore[attr-defined]


def _without_traceback(format_record: Callable[[logging.LogRecord], str]
                       ) -> Callable[[logging.LogRecord], str]:
    def format_message(record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return format_record(record)
        finally:  # other handlers (the API log) still get the whole record
            record.exc_info, record.exc_text, record.stack_info = saved

    return format_message


def _request(args: argparse.Namespace) -> tuple[OperatorProfile, RunRequest]:
    """The operator's profile (--config) and the run's request (--set), both checked here,
    before Prefect or any model is loaded."""
    from requant.profile import compose, load_file
    from requant.run_request import NAME, parse_request

    profile = load_file(args.config)
    name = profile.name if re.fullmatch(NAME, profile.name) else "demo"
    request = parse_request(args.overrides, base={"profile": name})
    settings = compose(profile, request)  # every bound the profile sets, before any work
    if args.command == "run":
        from requant.source import check_local_source

        check_local_source(settings.source)  # a broken model folder: one line, no Prefect
    return profile, request


def _load(args: argparse.Namespace) -> PipelineSettings:
    from requant.profile import compose

    return compose(*_request(args))


def cmd_run(args: argparse.Namespace) -> int:
    profile, request = _request(args)  # bad input ends here, before Prefect or any model
    _console_without_tracebacks(args)
    print(args.prefect_api, file=sys.stderr)
    from requant.flows.requantize import requantize
    from requant.profile import using
    from requant.report import gate_line, publish_line, rollout_line

    with using(profile):
        summary = requantize(request)
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
    profile, request = _request(args)
    from requant.flows.promote import promote
    from requant.profile import checkpoint_in_profile, compose, using
    from requant.rollout.release import check_revision

    settings = compose(profile, request)
    if args.revision:  # refused here, before Prefect starts
        check_revision(args.revision)
    if args.checkpoint is not None:
        checkpoint_in_profile(profile, settings, args.checkpoint)
    _console_without_tracebacks(args)
    print(args.prefect_api, file=sys.stderr)
    with using(profile):
        result = promote(request, args.revision, args.checkpoint, args.rollback, args.force)
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


def cmd_noise(args: argparse.Namespace) -> int:
    settings = _load(args)
    from requant.evaluation.noise import measure_noise, noise_key, noise_line, save_noise
    from requant.evaluation.task_files import effective_looks, validate_tasks
    from requant.quantization.hardware import detect_accelerator
    from requant.source import resolve_source_files

    ev = settings.evaluation
    stages = len(effective_looks(ev, settings.gate))
    if not 1 <= args.stages <= stages:
        raise SettingsError(f"--stages: the gate has {stages} stage(s); choose 1 to {stages}.")
    validate_tasks(ev)
    source = resolve_source_files(settings.source, with_weights=True)
    on_gpu = detect_accelerator(settings.quantization.device).kind == "cuda"
    key = noise_key(source.as_record(), ev, settings.gate, on_gpu)
    record = measure_noise(ev, settings.gate, source.path, stages=args.stages, on_gpu=on_gpu)
    path = save_noise(settings.cache_dir, key, record)
    print(noise_line(record))
    print(f"prompts paired: {record['prompts_paired']}; the gate on A vs A: "
          f"{record['decision_against_itself']['status']}\nrecorded in {path}")
    return EXIT_OK


def cmd_automations(args: argparse.Namespace) -> int:
    from requant.alerts import apply_automations

    apply_automations()
    return EXIT_OK


def cmd_settings_schema(args: argparse.Namespace) -> int:
    from requant.run_request import RunRequest

    model = RunRequest if args.run else PipelineSettings
    print(json.dumps(model.model_json_schema(), indent=2))
    return EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "promote": cmd_promote, "status": cmd_status, "down": cmd_down,
    "runs": cmd_runs, "noise": cmd_noise, "settings-schema": cmd_settings_schema,
    "automations": cmd_automations,
}


if __name__ == "__main__":
    sys.exit(main())
