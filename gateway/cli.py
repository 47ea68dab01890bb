"""The ``lockgate`` command: serve the gateway, manage keys and approvals, read the audit."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.settings import Settings, SettingsError, describe_settings, load_settings

if TYPE_CHECKING:
    from gateway.policy.guard import Finding
    from gateway.policy.replay import Difference
    from gateway.policy.source import PolicySource
    from gateway.runtime import Runtime
    from gateway.types import Principal

APPROVAL_STATES = ("pending", "approved", "denied", "expired", "executing", "executed", "failed")


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(args.config, **overrides)


def _with_store(args: argparse.Namespace, action: Callable[[AsyncEngine], Awaitable[int]]) -> int:
    from gateway.runtime import open_store

    async def run() -> int:
        engine = await open_store(_settings(args))
        try:
            return await action(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.runtime import build_runtime

    settings = _settings(args, host=args.host, port=args.port)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def check() -> None:
        await (await build_runtime(settings)).close()

    # Everything the app builds at start-up, built once and closed again before the port is bound:
    # a policy that cannot serve, a store that does not answer or a catalog naming an unknown
    # provider is then one line and exit 2, where uvicorn's lifespan would print a traceback.
    asyncio.run(check())
    print(f"lockgate: serving on http://{settings.host}:{settings.port}/v1 "
          f"(store {settings.database_url.split('@')[-1]}, models {', '.join(m.name for m in settings.models)})",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                log_level=settings.log_level, access_log=settings.access_log, lifespan="on")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from gateway.auth import KeyStore

    async def action(engine: AsyncEngine) -> int:
        issued = await KeyStore(engine, 0).create(user=args.user, team=args.team, org=args.org, roles=tuple(args.role))
        record = issued.record
        print(f"Created key {record.id} for user {record.user}, team {record.team}, org {record.org}.", file=sys.stderr)
        print("Store it now: it is shown only this once.", file=sys.stderr)
        print(issued.key)
        return 0

    return _with_store(args, action)


def cmd_keys_list(args: argparse.Namespace) -> int:
    from gateway.auth import KeyStore

    async def action(engine: AsyncEngine) -> int:
        keys = await KeyStore(engine, 0).list()
        rows = [[k.id, k.prefix + "...", k.user, k.team, k.org, ",".join(k.roles) or "-",
                 _when(k.created_at), "revoked " + _when(k.revoked_at) if k.revoked_at else "active"] for k in keys]
        _table(["ID", "KEY", "USER", "TEAM", "ORG", "ROLES", "CREATED", "STATE"], rows)
        return 0

    return _with_store(args, action)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from gateway.auth import KeyStore

    async def action(engine: AsyncEngine) -> int:
        if await KeyStore(engine, 0).revoke(args.key_id):
            print(f"Revoked {args.key_id}. Running gateways refuse it within auth_cache_ttl_s seconds.")
            return 0
        print(f"lockgate: no active key {args.key_id}", file=sys.stderr)
        return 1

    return _with_store(args, action)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    import os

    from gateway.audit.verify import verify

    settings = _settings(args)
    key = os.environ.get(settings.audit_key_env, "")

    async def action(engine: AsyncEngine) -> int:
        report = await verify(engine, key)
        for note in report.notes:
            print(f"lockgate: note: {note}", file=sys.stderr)
        if report.broken is not None:
            where = f"record {report.broken.seq}" + (f" ({report.broken.record_id})" if report.broken.record_id else "")
            print(f"BROKEN at {where}: {report.broken.why}")
            return 1
        span = f"records {report.first} to {report.last}" if report.records else "no chained records"
        print(f"intact: {span} ({report.records} checked)")
        return 0

    return _with_store(args, action)


def cmd_audit_prune(args: argparse.Namespace) -> int:
    import os
    from datetime import UTC

    from gateway.audit.verify import prune

    settings = _settings(args)
    key = os.environ.get(settings.audit_key_env, "")
    try:
        before = datetime.fromisoformat(args.before)
    except ValueError:
        print(f"lockgate: --before must be a date or time such as 2026-11-01, got {args.before!r}", file=sys.stderr)
        return 2
    before = before if before.tzinfo else before.replace(tzinfo=UTC)

    async def action(engine: AsyncEngine) -> int:
        deleted, last = await prune(engine, before, key)
        if last is None:
            print(f"Nothing to prune before {before.isoformat()}.")
        else:
            print(f"Pruned {deleted} records (the chain up to record {last}) made before {before.isoformat()}; "
                  "a signed checkpoint keeps the rest verifiable.")
        return 0

    return _with_store(args, action)


def _utc(value: str | None) -> datetime | None:
    """A --since/--until value: ISO 8601, UTC unless it names its zone."""
    if value is None:
        return None
    from datetime import UTC

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SystemExit(f"lockgate: {value!r} is not a date or time such as 2026-11-01 or 2026-11-01T12:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_traces_list(args: argparse.Namespace) -> int:
    from gateway.audit.reader import list_decisions

    async def action(engine: AsyncEngine) -> int:
        rows = await list_decisions(engine, limit=args.limit, since=_utc(args.since), until=_utc(args.until),
                                    user=args.user, team=args.team, model=args.model, outcome=args.outcome,
                                    revision=args.revision, approval=args.approval)
        if args.json:
            print(json.dumps(rows, default=str, indent=2))
            return 0
        header = ["TRACE", "TIME (UTC)", "ENDPOINT", "OUTCOME", "STATUS", "USER", "TEAM", "MODEL", "TOKENS", "COST $",
                  "MS"]
        _table(header, [
            [r["trace_id"], _when(r["created_at"]), r["endpoint"], r["outcome"], str(r["status_code"]),
             r["user"] or "-", r["team"] or "-", _model(r), f"{r['input_tokens']}/{r['output_tokens']}",
             f"{r['cost_micro_usd'] / 1e6:.6f}", f"{r['duration_ms']:.1f}"] for r in rows])
        return 0

    return _with_store(args, action)


def cmd_traces_export(args: argparse.Namespace) -> int:
    """Every record matching the filters, oldest first, as JSON lines or CSV on stdout."""
    import csv

    from gateway.audit.reader import list_decisions
    from gateway.store import DECISION_COLUMNS

    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat().replace("+00:00", "Z")
        if isinstance(value, (dict, list)) and args.format == "csv":
            return json.dumps(value, default=str, sort_keys=True)
        return value

    async def action(engine: AsyncEngine) -> int:
        rows = await list_decisions(engine, limit=args.limit, since=_utc(args.since), until=_utc(args.until),
                                    user=args.user, team=args.team, model=args.model, outcome=args.outcome,
                                    revision=args.revision, approval=args.approval)
        rows.reverse()  # oldest first, as an export is read
        if args.format == "jsonl":
            for row in rows:
                print(json.dumps({name: plain(value) for name, value in row.items()}, default=str))
        else:
            writer = csv.writer(sys.stdout)
            writer.writerow(DECISION_COLUMNS)
            for row in rows:
                writer.writerow([plain(row.get(name)) for name in DECISION_COLUMNS])
        print(f"lockgate: exported {len(rows)} records", file=sys.stderr)
        return 0

    return _with_store(args, action)


def cmd_traces_show(args: argparse.Namespace) -> int:
    from gateway.audit.reader import read_trace, span_tree

    async def action(engine: AsyncEngine) -> int:
        decisions, spans = await read_trace(engine, args.trace_id)
        if not decisions and not spans:
            print(f"lockgate: no trace {args.trace_id} (audit rows are written within audit_flush_interval_s)",
                  file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"decisions": decisions, "spans": spans}, default=str, indent=2))
            return 0
        for d in decisions:
            print(f"decision {d['id']}  {d['endpoint']}  {d['outcome']} ({d['status_code']})  {_when(d['created_at'])}")
            print(f"  caller   {d['user']} / team {d['team']} / org {d['org']}  key {d['key_id']}")
            print(f"  model    {_model(d)}  provider {d['provider'] or '-'}  stream {d['stream']}")
            print(f"  reasons  {'; '.join(d['reasons']) or '-'}")
            if d["error_type"]:
                print(f"  error    {d['error_type']}: {d['error_message']}")
            print(f"  usage    {d['input_tokens']} in / {d['output_tokens']} out  "
                  f"cost ${d['cost_micro_usd'] / 1e6:.6f}  {d['duration_ms']:.1f} ms")
        print("spans")
        for depth, s in span_tree(spans):
            ms = (s["end_ns"] - s["start_ns"]) / 1e6
            print(f"  {'  ' * depth}{s['name']}  [{s['kind'].lower()}, {s['status'].lower()}, {ms:.2f} ms]")
            for key, value in sorted(s["attributes"].items()):
                print(f"  {'  ' * depth}    {key} = {value}")
        return 0

    return _with_store(args, action)


def _as_principal(args: argparse.Namespace, action: Callable[[Runtime, Principal], Awaitable[int]]) -> int:
    """Run ``action`` as the principal of the caller's key: from ``--key-file``, else the
    environment variable LOCKGATE_API_KEY, else asked for on the terminal. Never a name."""
    import getpass
    import os

    from gateway.errors import GatewayError
    from gateway.runtime import build_runtime

    if args.key_file:
        try:
            key = Path(args.key_file).read_text().strip()
        except OSError as exc:
            print(f"lockgate: cannot read {args.key_file}: {exc.strerror}", file=sys.stderr)
            return 2
    else:
        key = os.environ.get("LOCKGATE_API_KEY", "")
        if not key and sys.stdin.isatty():
            key = getpass.getpass("Lockgate key (approver or admin): ").strip()
    if not key:
        print("lockgate: this command acts as a key with the approver or admin role: put it in LOCKGATE_API_KEY "
              "or a file named by --key-file", file=sys.stderr)
        return 2

    async def run() -> int:
        runtime = await build_runtime(_settings(args))
        try:
            principal = await runtime.keys.authenticate(key)
            return await action(runtime, principal)
        except GatewayError as exc:
            print(f"lockgate: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await runtime.close()

    return asyncio.run(run())


def cmd_budgets_show(args: argparse.Namespace) -> int:
    async def action(runtime: Runtime, principal: Principal) -> int:
        from gateway.errors import DecisionRefused
        from gateway.store import utcnow

        if not {"admin", "reviewer"}.intersection(principal.roles):
            raise DecisionRefused("Showing budgets needs a key with the admin or reviewer role.")
        rows = await runtime.ledger.view(principal.org, utcnow())
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0

        def amount(row: dict[str, Any], value: int | None) -> str:
            if value is None:
                return "-"
            return f"${value / 1e6:,.4f}" if row["unit"] == "usd" else f"{value:,} {row['unit']}"

        _table(["SCOPE", "WINDOW", "PERIOD (UTC)", "SPENT", "RESERVED", "LIMIT"], [
            [r["scope"], r["window"], r["period"], amount(r, r["spent"]), amount(r, r["reserved"]),
             amount(r, r["limit"])] for r in rows])
        if not rows:
            print(f"No budget has been charged in org {principal.org} in the current periods.", file=sys.stderr)
        return 0

    return _as_principal(args, action)


def cmd_approvals_list(args: argparse.Namespace) -> int:
    async def action(runtime: Runtime, principal: Principal) -> int:
        rows = await runtime.approvals.list(principal.org, None if args.status == "all" else args.status)
        if args.json:
            from gateway.approvals import public

            print(json.dumps([public(a) for a in rows], indent=2))
            return 0
        _table(["ID", "STATUS", "USER", "TEAM", "ENDPOINT", "MODEL", "APPROVERS", "REASON", "CREATED", "EXPIRES"], [
            [a.id, a.status, a.user, a.team, a.endpoint, a.model, ",".join(a.approvers) or "-", a.reason,
             _when(a.created_at), _when(a.expires_at)] for a in rows])
        if not rows:
            print(f"No {'' if args.status == 'all' else args.status + ' '}approvals in org {principal.org}.",
                  file=sys.stderr)
        return 0

    return _as_principal(args, action)


def cmd_approvals_show(args: argparse.Namespace) -> int:
    from gateway.approvals import public

    async def action(runtime: Runtime, principal: Principal) -> int:
        print(json.dumps(public(await runtime.approvals.visible(args.approval_id, principal)), indent=2))
        return 0

    return _as_principal(args, action)


def _decide(approve: bool) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        async def action(runtime: Runtime, principal: Principal) -> int:
            approval = await runtime.approvals.decide(args.approval_id, principal, approve, args.reason)
            print(f"{'Approved' if approve else 'Denied'} {approval.id} as {principal.user} (key {principal.key_id}).")
            return 0

        return _as_principal(args, action)

    return command


def _policy(args: argparse.Namespace, folder_flag: str | None = None) -> tuple[PolicySource, Path] | None:
    """The policy folder a command works on, read: ``--policy-dir``, else the setting policy_dir as
    the gateway reads it (LOCKGATE_POLICY_DIR over the YAML file of --config or LOCKGATE_CONFIG),
    else the shipped policies. Says on stderr which folder and revision it used; None (after
    saying why) when the folder cannot be read."""
    from gateway.policy.source import PolicyLoadError, load_policy_source
    from gateway.runtime import policy_folder

    settings = _settings(args)
    if folder_flag:
        folder, origin = Path(folder_flag), "--policy-dir"
    elif "LOCKGATE_POLICY_DIR" in os.environ:
        folder, origin = policy_folder(settings), "LOCKGATE_POLICY_DIR"
    elif settings.policy_dir:
        folder, origin = policy_folder(settings), f"policy_dir in {args.config or os.environ.get('LOCKGATE_CONFIG')}"
    else:
        folder, origin = policy_folder(settings), "the shipped policies"
    try:
        source = load_policy_source(folder, settings.models)
    except PolicyLoadError as exc:
        print(f"lockgate: policy folder {folder} (from {origin}) cannot be read: {exc}", file=sys.stderr)
        return None
    print(f"lockgate: policy folder {folder} (from {origin}), revision {source.revision}", file=sys.stderr, flush=True)
    return source, folder


def _located(finding: Finding, folder: Path) -> str:
    """A finding with its file named from the working directory, as compilers print them."""
    if not finding.file:
        return str(finding)
    return str(replace(finding, file=str(folder / finding.file)))


def cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.policy.preflight import vet_policy

    loaded = _policy(args, args.policy_dir)
    if loaded is None:
        return 1
    source, folder = loaded
    vetting = vet_policy(source, with_tests=True)
    for finding in vetting.findings:
        print(_located(finding, folder))
    errors, warnings = len(vetting.errors), len(vetting.warnings)
    verdict = "refused: the gateway would not load it" if errors else "it loads"
    print(f"{errors} error{'' if errors == 1 else 's'}, {warnings} warning{'' if warnings == 1 else 's'}: {verdict}")
    return 1 if errors else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from gateway.policy.source import PolicyLoadError
    from gateway.policy.testing import run_policy_tests

    loaded = _policy(args, args.policy_dir)
    if loaded is None:
        return 2
    source, folder = loaded
    try:
        results = run_policy_tests(source)
    except PolicyLoadError as exc:
        print(f"lockgate: policy in {folder} cannot be tested: {exc}", file=sys.stderr)
        return 2
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'} {result.rule}{'' if result.passed else ': ' + result.detail}")
    failed = sum(1 for r in results if not r.passed)
    print(f"{len(results) - failed} passed, {failed} failed")
    if not results:
        print(f"lockgate: no test_ rules in {folder}'s *_test.rego files", file=sys.stderr)
    return 1 if failed or not results else 0


def cmd_policy_eval(args: argparse.Namespace) -> int:
    from gateway.policy import DECISION, parse_decision
    from gateway.policy.embedded import PolicyEngineError
    from gateway.policy.preflight import evaluate_in_child

    try:
        text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text()
        policy_input = json.loads(text)
    except OSError as exc:
        print(f"lockgate: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        print(f"lockgate: {args.input} is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(policy_input, dict):
        print(f"lockgate: {args.input} must hold a JSON object, the policy input", file=sys.stderr)
        return 2
    loaded = _policy(args, args.policy_dir)
    if loaded is None:
        return 1
    try:
        answer = next(evaluate_in_child(loaded[0], [(args.rule, policy_input)]))
    except ValueError as exc:
        print(f"lockgate: the policy cannot be evaluated: {exc}", file=sys.stderr)
        return 1
    if answer.error is not None:
        print(f"lockgate: {answer.error}", file=sys.stderr)
        return 1
    print(json.dumps(answer.value, indent=2, sort_keys=True))
    if args.rule == DECISION:
        try:
            parse_decision(answer.value)
        except PolicyEngineError as exc:
            print(f"lockgate: the gateway would deny this call with 503 policy_error: {exc}", file=sys.stderr)
    return 0


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _since(value: str) -> datetime:
    """--since: a duration back from now (90m, 1h, 7d) or a date or time."""
    from datetime import UTC, timedelta

    if value[:-1].isdigit() and value[-1:] in _DURATION:
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * _DURATION[value[-1]])
    moment = _utc(value)
    assert moment is not None
    return moment


def _differences(differences: Iterator[Difference], header: str) -> None:
    """The table of changed decisions, a line each as they come (``| head`` stops it early)."""
    from gateway.policy.replay import describe

    print(f"{'RECORD':<26}  {'TIME (UTC)':<19}  {'TEAM':<12}  {'USER':<12}  {'MODEL':<14}  {header:<28}  CHANGES")
    for d in differences:
        r = d.record
        print(f"{r['id']:<26}  {_when(r['created_at']):<19}  {r['team'] or '-':<12}  {r['user'] or '-':<12}  "
              f"{r['requested_model'] or '-':<14}  {describe(d.before) + ' -> ' + describe(d.after):<28}  "
              f"{', '.join(d.changes)}", flush=True)


def cmd_policy_replay(args: argparse.Namespace) -> int:
    from gateway.audit.reader import list_decisions
    from gateway.policy.replay import Tally, replay

    loaded = _policy(args, args.policy_dir)
    if loaded is None:
        return 1
    source = loaded[0]
    since = _since(args.since)

    async def action(engine: AsyncEngine) -> int:
        records = await list_decisions(engine, limit=args.limit, since=since, team=args.team)
        records.reverse()  # oldest first
        print(f"lockgate: replaying {len(records)} recorded calls since {since.isoformat(timespec='seconds')} "
              "against the candidate policy", file=sys.stderr, flush=True)
        tally = Tally()

        def progress(done: int, total: int) -> None:
            if total > done or done > 500:
                print(f"lockgate: {done}/{total} replayed", file=sys.stderr, flush=True)

        try:
            _differences(replay(source, records, tally, progress), "RECORDED -> CANDIDATE")
        except ValueError as exc:
            print(f"lockgate: the candidate policy cannot be evaluated: {exc}", file=sys.stderr)
            return 1
        print(tally.summary())
        return 0

    return _with_store(args, action)


def cmd_policy_shadow_report(args: argparse.Namespace) -> int:
    from gateway.audit.reader import list_decisions
    from gateway.policy.replay import Tally, shadow_disagreements

    settings = _settings(args)
    since = _since(args.since)
    print(f"lockgate: shadow policy folder {settings.policy_shadow_dir or '(policy_shadow_dir is not set)'}",
          file=sys.stderr, flush=True)

    async def action(engine: AsyncEngine) -> int:
        records = await list_decisions(engine, limit=args.limit, since=since, team=args.team)
        records.reverse()
        revisions = sorted({r["shadow"]["revision"] for r in records if isinstance(r.get("shadow"), dict)})
        print(f"lockgate: {len(records)} records since {since.isoformat(timespec='seconds')}; shadow revisions "
              f"{', '.join(revisions) or '(none recorded)'}", file=sys.stderr, flush=True)
        tally = Tally()
        _differences(shadow_disagreements(records, tally), "LIVE -> SHADOW")
        print(tally.summary().replace("would change", "disagree").replace(
            "records without a policy input", "records without a shadow decision"))
        return 0

    return _with_store(args, action)


def cmd_settings(args: argparse.Namespace) -> int:
    print(describe_settings())
    return 0


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _model(row: dict[str, Any]) -> str:
    requested, routed = row["requested_model"] or "-", row["routed_model"]
    return requested if not routed or routed == requested else f"{requested}->{routed}"


def _table(header: list[str], rows: list[list[str]]) -> None:
    if not rows:
        print("(none)")
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


def _trace_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="from this date or time (UTC unless it says otherwise)")
    parser.add_argument("--until", help="before this date or time (UTC unless it says otherwise)")
    parser.add_argument("--user")
    parser.add_argument("--team")
    parser.add_argument("--model", help="requested or routed model")
    parser.add_argument("--outcome", choices=["allowed", "denied", "held", "failed"])
    parser.add_argument("--revision", help="policy revision (sha256:...)")
    parser.add_argument("--approval", help="approval id (apr_...)")


def _record_filters(command: argparse.ArgumentParser) -> None:
    """The records ``policy replay`` and ``policy shadow-report`` read."""
    command.add_argument("--since", default="24h", help="a duration back from now (90m, 1h, 7d) or a date or time "
                                                        "(default: 24h)")
    command.add_argument("--team", help="only this team's calls")
    command.add_argument("--limit", type=int, default=100_000, help="at most this many of the latest records")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lockgate", description="Lockgate, the governance-first LLM gateway.")
    parser.add_argument("--config", help="YAML settings file (default: $LOCKGATE_CONFIG, else built-in defaults)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="listen address (setting host)")
    serve.add_argument("--port", type=int, help="listen port (setting port)")
    serve.set_defaults(func=cmd_serve)

    keys = commands.add_parser("keys", help="virtual API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--user", required=True)
    create.add_argument("--team", required=True)
    create.add_argument("--org", default="default")
    create.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    create.set_defaults(func=cmd_keys_create)
    keys.add_parser("list", help="list keys (never the keys themselves)").set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)

    audit = commands.add_parser("audit", help="the audit's hash chain").add_subparsers(dest="audit", required=True)
    audit.add_parser("verify", help="walk the hash chain; name the first record that does not fit").set_defaults(
        func=cmd_audit_verify)
    aprune = audit.add_parser("prune", help="delete old records, leaving a checkpoint so verify still passes")
    aprune.add_argument("--before", required=True, help="a date or time, UTC unless it says otherwise")
    aprune.set_defaults(func=cmd_audit_prune)

    traces = commands.add_parser("traces", help="read the audit").add_subparsers(dest="traces", required=True)
    tlist = traces.add_parser("list", help="the latest calls, newest first")
    tlist.add_argument("--limit", type=int, default=20)
    _trace_filters(tlist)
    tlist.add_argument("--json", action="store_true")
    tlist.set_defaults(func=cmd_traces_list)
    export = traces.add_parser("export", help="records matching the filters, oldest first, to stdout")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--limit", type=int, default=1_000_000)
    _trace_filters(export)
    export.set_defaults(func=cmd_traces_export)
    show = traces.add_parser("show", help="one call: its decision record and span tree")
    show.add_argument("trace_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_traces_show)

    budgets = commands.add_parser("budgets", help="budgets and rate limits").add_subparsers(
        dest="budgets", required=True)
    bshow = budgets.add_parser("show", help="spent, reserved and limit per scope and window, in the current periods")
    bshow.add_argument("--json", action="store_true")
    bshow.add_argument("--key-file", help="file holding an admin or reviewer key (default: LOCKGATE_API_KEY)")
    bshow.set_defaults(func=cmd_budgets_show)

    approvals = commands.add_parser("approvals", help="the approval queue").add_subparsers(
        dest="approvals", required=True)
    key_help = "file holding the key to act as (default: the environment variable LOCKGATE_API_KEY)"
    alist = approvals.add_parser("list", help="your org's approvals, oldest first")
    alist.add_argument("--status", default="pending", choices=[*APPROVAL_STATES, "all"])
    alist.add_argument("--json", action="store_true")
    alist.add_argument("--key-file", help=key_help)
    alist.set_defaults(func=cmd_approvals_list)
    ashow = approvals.add_parser("show", help="one approval")
    ashow.add_argument("approval_id")
    ashow.add_argument("--key-file", help=key_help)
    ashow.set_defaults(func=cmd_approvals_show)
    for verb, approve in (("approve", True), ("deny", False)):
        decide = approvals.add_parser(verb, help=f"{verb} a pending call, as the key's principal")
        decide.add_argument("approval_id")
        decide.add_argument("--reason", help="why (recorded, and shown to the caller when denied)")
        decide.add_argument("--key-file", help=key_help)
        decide.set_defaults(func=_decide(approve))

    policy = commands.add_parser("policy", help="write, test, replay and shadow policies").add_subparsers(
        dest="policy", required=True)
    folder_help = "policy folder (default: setting policy_dir, else the shipped policies)"
    pcheck = policy.add_parser("check", help="compile the policy and its tests, run the load-time guard and the "
                                             "float-money lint; exit 1 on errors")
    pcheck.add_argument("--policy-dir", help=folder_help)
    pcheck.set_defaults(func=cmd_policy_check)
    ptest = policy.add_parser("test", help="run the test_ rules of the policy's *_test.rego files")
    ptest.add_argument("--policy-dir", help=folder_help)
    ptest.set_defaults(func=cmd_policy_test)
    peval = policy.add_parser("eval", help="the policy's decision for one input, as JSON on stdout")
    peval.add_argument("--input", required=True, help="file holding the policy input as JSON ('-': stdin)")
    peval.add_argument("--rule", default="data.lockgate.decision", help="the rule to evaluate")
    peval.add_argument("--policy-dir", help=folder_help)
    peval.set_defaults(func=cmd_policy_eval)
    preplay = policy.add_parser("replay", help="re-decide recorded calls with a candidate policy; list every "
                                               "decision that would change")
    _record_filters(preplay)
    preplay.add_argument("--policy-dir", help="the candidate policy folder (default: setting policy_dir)")
    preplay.set_defaults(func=cmd_policy_replay)
    pshadow = policy.add_parser("shadow-report", help="recorded calls where the shadow policy (policy_shadow_dir) "
                                                      "disagreed with the live one")
    _record_filters(pshadow)
    pshadow.set_defaults(func=cmd_policy_shadow_report)

    commands.add_parser("settings", help="list every setting").set_defaults(func=cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gateway.runtime import StartupError

    try:
        return int(args.func(args))
    except (SettingsError, StartupError) as exc:
        print(f"lockgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``lockgate traces list | head``): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
