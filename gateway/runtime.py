"""The composition root: settings in, every runtime object out, built once and closed once.

Nothing else in the gateway constructs clients, engines or stores; the app receives the
``Runtime`` through its lifespan state, and tests build one the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.anthropic import AnthropicProvider
from adapters.azure_openai import AzureOpenAIProvider
from adapters.mock import MockProvider
from adapters.openai import OpenAIProvider
from gateway.approvals import ApprovalQueue
from gateway.audit.journal import Journal
from gateway.audit.metrics import Metrics, otlp_metric_reader
from gateway.audit.tracing import build_tracer_provider, otlp_processor
from gateway.audit.writer import AuditWriter
from gateway.auth import KeyStore
from gateway.budgets import BudgetLedgerStore, LeaseReaper
from gateway.pipeline import Holding, Pipeline
from gateway.policy import PolicyStage
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.opa import OpaConfig, OpaEngine
from gateway.policy.preflight import run_preflight
from gateway.policy.reload import BundleWatcher, PolicyReloader
from gateway.policy.source import PolicySource, default_policy_dir, load_policy_source
from gateway.routing import Router, RoutingLimits
from gateway.settings import Settings
from gateway.store import DirectStatements, create_store_engine, create_tables
from gateway.stored_responses import StoredResponses
from gateway.types import Provider, RemotePolicyEngine
from gateway.upstream import UpstreamClient, build_http_client
from gateway.webhook import Webhook

log = logging.getLogger("lockgate.runtime")


class StartupError(RuntimeError):
    """The gateway cannot start with these settings; the message says why."""


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    direct: DirectStatements
    http: UpstreamClient
    tracer_provider: TracerProvider
    audit: AuditWriter
    keys: KeyStore
    approvals: ApprovalQueue
    ledger: BudgetLedgerStore
    policy: PolicyStage
    router: Router
    pipeline: Pipeline
    reaper: LeaseReaper
    metrics: Metrics | None = None
    shadow: PolicyStage | None = None  # the candidate policy of policy_shadow_dir
    reloaders: tuple[PolicyReloader | BundleWatcher, ...] = ()

    async def close(self) -> None:
        for reloader in self.reloaders:
            await reloader.close()
        await self.reaper.close()
        await self.approvals.close()
        self.tracer_provider.shutdown()  # spans are already rows in the writer; this stops the extra processors
        if self.metrics is not None:
            self.metrics.shutdown()  # a last export
        await self.audit.close()
        await self.http.aclose()
        await self.engine.dispose()
        await self.direct.close()
        await close_policy(self.policy)
        if self.shadow is not None:
            self.shadow.engine.close()


async def close_policy(stage: PolicyStage) -> None:
    stage.engine.close()
    if stage.remote:
        await cast(RemotePolicyEngine, stage.engine).aclose()


def policy_folder(settings: Settings) -> Path:
    return Path(settings.policy_dir) if settings.policy_dir else default_policy_dir()


def build_policy(settings: Settings, folder: Path | None = None) -> PolicyStage:
    """Load, vet and compile the policy (of ``folder``, else the configured one); raise
    StartupError with the reason if it cannot serve."""
    folder = folder or policy_folder(settings)
    try:
        source = load_policy_source(folder, settings.models)
        run_preflight(source)
        return PolicyStage(EmbeddedEngine(source), settings.policy_cache_size, source.revision)
    except (ValueError, RuntimeError) as exc:
        raise StartupError(f"policy in {folder} cannot be used: {exc}") from None


def opa_config(settings: Settings) -> OpaConfig:
    return OpaConfig(url=settings.opa_url, mode=settings.opa_mode, timeout_s=settings.opa_timeout_s,
                     token=settings.secret(settings.opa_token_env))


async def build_live_policy(settings: Settings) -> PolicyStage:
    """The policy that decides, on the configured engine: embedded (``build_policy``), or an OPA
    server the policy is pushed to or that serves the team's bundle (gateway/policy/opa.py)."""
    if settings.policy_engine != "opa":
        return build_policy(settings)
    config, folder = opa_config(settings), policy_folder(settings)
    engine: OpaEngine | None = None
    try:
        source = load_policy_source(folder, settings.models) if config.mode == "push" else None
        if source is not None:  # the load-time guard holds for OPA too: no http.send, net.*, recursion
            await asyncio.to_thread(run_preflight, source, sample=False)
        engine = OpaEngine(config, source)
        await engine.start()
    except (ValueError, RuntimeError) as exc:
        if engine is not None:
            await engine.aclose()
        what = f"policy in {folder}, pushed to OPA at {config.url}," if config.mode == "push" \
            else f"the bundle OPA serves at {config.url}"
        raise StartupError(f"{what} cannot be used: {exc}") from None
    log.info("policy engine: OPA at %s (%s mode), revision %s", config.url, config.mode, engine.revision)
    return PolicyStage(engine, settings.policy_cache_size, engine.revision)


def journal_folder(settings: Settings) -> Path:
    """The audit journal's folder: as set, else beside a SQLite store, else in the working directory."""
    if settings.audit_journal_dir:
        return Path(settings.audit_journal_dir)
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        return Path(url.database + ".journal")
    return Path("lockgate.journal")


def _store_name(settings: Settings) -> str:
    return settings.database_url.split("@")[-1]  # never the credentials


def _without_password(settings: Settings, message: object) -> str:
    """A driver's error text, with the store's password taken out should the driver quote it."""
    text = str(message)
    try:
        password = make_url(settings.database_url).password
    except ArgumentError:
        return text
    return text.replace(str(password), "***") if password else text


async def open_store(settings: Settings) -> AsyncEngine:
    engine = create_store_engine(settings.database_url)
    try:
        await create_tables(engine)
    except Exception as exc:
        await engine.dispose()
        raise StartupError(f"cannot open the store at {_store_name(settings)}: "
                           f"{_without_password(settings, exc)}") from None
    return engine


async def open_direct_statements(settings: Settings) -> DirectStatements:
    direct = None
    try:
        direct = await DirectStatements.open(settings.database_url)
        await direct.ping()  # SQLite's connection opens on first use: fail here, not on the first call
        return direct
    except Exception as exc:
        if direct is not None:
            await direct.close()
        raise StartupError(f"cannot open the store at {_store_name(settings)}: "
                           f"{_without_password(settings, exc)}") from None


async def build_runtime(settings: Settings, extra_span_processors: Sequence[SpanProcessor] = (),
                        metric_readers: Sequence[MetricReader] = ()) -> Runtime:
    # The shadow policy is always evaluated in process: pushed to the same OPA, its packages would
    # collide with the live ones.
    shadow = build_policy(settings, Path(settings.policy_shadow_dir)) if settings.policy_shadow_dir else None
    policy = await build_live_policy(settings)
    try:
        engine = await open_store(settings)
    except StartupError:
        await close_policy(policy)
        raise
    try:
        direct = await open_direct_statements(settings)
    except StartupError:
        await engine.dispose()
        await close_policy(policy)
        raise
    journal_root = journal_folder(settings)
    try:
        journal = Journal(journal_root)
    except OSError as exc:
        await engine.dispose()
        await direct.close()
        await close_policy(policy)
        raise StartupError(f"cannot open the audit journal in {journal_root}: {exc.strerror}") from None
    audit = AuditWriter(direct, settings.audit_flush_interval_s, settings.audit_batch_size, journal,
                        checkpoint_key=settings.secret(settings.audit_key_env))
    await audit.replay(journal_root)  # the records of calls a process that is gone answered but never wrote
    if settings.otlp_endpoint:
        extra_span_processors = (*extra_span_processors, otlp_processor(settings.otlp_endpoint))
        metric_readers = (*metric_readers, otlp_metric_reader(settings.otlp_endpoint))
    tracer_provider = build_tracer_provider(audit, extra_span_processors)
    metrics = Metrics(metric_readers) if metric_readers else None
    tracer = tracer_provider.get_tracer("lockgate")
    limits = RoutingLimits(
        retries=settings.upstream_retries, first_byte_timeout_s=settings.upstream_first_byte_timeout_s,
        idle_timeout_s=settings.upstream_idle_timeout_s, deadline_s=settings.upstream_deadline_s,
        cooldown_failures=settings.upstream_cooldown_failures, cooldown_s=settings.upstream_cooldown_s)
    # The router holds each attempt to its own limits; the transport's read timeout only backs them up.
    http = build_http_client(timeout_s=max(limits.first_byte_timeout_s, limits.idle_timeout_s),
                             connect_timeout_s=settings.upstream_connect_timeout_s,
                             max_connections=settings.upstream_max_connections)
    providers: dict[str, Provider] = {"openai": OpenAIProvider(http), "azure_openai": AzureOpenAIProvider(http),
                                      "anthropic": AnthropicProvider(http, settings.default_output_tokens),
                                      "mock": MockProvider(settings.mock_stream_delay_s)}
    try:
        router = Router(settings.models, providers, settings.secret, tracer, limits)
    except ValueError as exc:
        tracer_provider.shutdown()
        if metrics is not None:
            metrics.shutdown()
        await http.aclose()
        await engine.dispose()
        await direct.close()
        await close_policy(policy)
        raise StartupError(str(exc)) from None
    keys = KeyStore(engine, settings.auth_cache_ttl_s)
    webhook = None
    if settings.approval_webhook_url:
        secret = settings.secret(settings.approval_webhook_secret_env)
        if not secret:
            log.warning("the approval webhook is not signed: %s is not set", settings.approval_webhook_secret_env)
        webhook = Webhook(settings.approval_webhook_url, secret)
    approvals = ApprovalQueue(engine, policy=policy, tracer=tracer, poll_interval_s=settings.approval_poll_interval_s,
                              max_pending=settings.approval_max_pending, use_s=settings.approval_use_s,
                              webhook=webhook)
    ledger = BudgetLedgerStore(engine, direct, settings.spend_cache_ttl_s)
    pipeline = Pipeline(keys=keys, policy=policy, approvals=approvals, ledger=ledger, router=router,
                        audit=audit, tracer=tracer, max_request_bytes=settings.max_request_bytes,
                        max_request_depth=settings.max_request_depth, responses=StoredResponses(engine, audit),
                        holding=Holding(hold_s=settings.approval_hold_s, keepalive_s=settings.approval_keepalive_s,
                                        lease_s=settings.reservation_lease_s), metrics=metrics, shadow=shadow)
    audit.start()
    reaper = LeaseReaper(ledger, tracer, interval_s=max(0.5, min(30.0, settings.reservation_lease_s / 10)))
    reaper.start()
    def load(folder: Path) -> PolicySource:
        return load_policy_source(folder, settings.models)

    watchers: list[PolicyReloader | BundleWatcher] = []
    if not policy.remote:
        watchers.append(PolicyReloader(policy, policy_folder(settings), load, run_preflight, EmbeddedEngine, tracer,
                                       settings.policy_reload_interval_s, "live"))
    elif settings.opa_mode == "push":  # guarded as at start-up; OPA compiles and evaluates what is pushed
        config = opa_config(settings)
        watchers.append(PolicyReloader(policy, policy_folder(settings), load,
                                       lambda source: run_preflight(source, sample=False),
                                       lambda source: OpaEngine(config, source), tracer,
                                       settings.policy_reload_interval_s, "live"))
    else:
        watchers.append(BundleWatcher(policy, tracer, settings.policy_reload_interval_s))
    if shadow is not None:
        watchers.append(PolicyReloader(shadow, Path(settings.policy_shadow_dir), load, run_preflight, EmbeddedEngine,
                                       tracer, settings.policy_reload_interval_s, "shadow"))
    reloaders = tuple(watchers)
    for reloader in reloaders:
        reloader.start()
    return Runtime(settings=settings, engine=engine, direct=direct, http=http,
                   tracer_provider=tracer_provider, audit=audit,
                   keys=keys, approvals=approvals, ledger=ledger, policy=policy, router=router, pipeline=pipeline,
                   reaper=reaper, metrics=metrics, shadow=shadow, reloaders=reloaders)
