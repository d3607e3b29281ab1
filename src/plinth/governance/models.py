"""Governance tables: the model hub, provider reviews, approvals, kill switches and the audit chain.

Rows the gateway caches (catalog, providers, kill switches) carry `change_seq` from the shared change
counter (`plinth.tenancy.service.bump_change_counter`), so every worker notices a write on its next
poll. Audit records are never updated or deleted by Plinth: each one holds the hash of the one
before it, and `audit_head` holds the newest, so any edit, removal or reordering is detectable.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from plinth.storage import Base, utcnow


class CatalogModel(Base):
    """A model alias in the hub: who owns it, whether it may serve, and how sensitive data may be."""

    __tablename__ = "catalog_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(20))
    data_class: Mapped[str] = mapped_column(String(20))  # ceiling
    context_window: Mapped[int | None] = mapped_column(Integer)
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    prices: Mapped[dict[str, float] | None] = mapped_column(JSON)
    card_text: Mapped[str | None] = mapped_column(Text)
    card_links: Mapped[list[str]] = mapped_column(JSON, default=list)
    source: Mapped[str] = mapped_column(String(10), default="api")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    change_seq: Mapped[int] = mapped_column(BigInteger, index=True, default=0)


class CatalogDeployment(Base):
    """Where a catalogued model is served: provider, regions and its own classification ceiling."""

    __tablename__ = "catalog_deployments"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    model: Mapped[str] = mapped_column(ForeignKey("catalog_models.name", ondelete="RESTRICT"), index=True)
    provider: Mapped[str] = mapped_column(String(100))
    regions: Mapped[list[str]] = mapped_column(JSON, default=list)
    data_class: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    owner: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(10), default="api")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    change_seq: Mapped[int] = mapped_column(BigInteger, index=True, default=0)


class ProviderReview(Base):
    """The due-diligence record of one provider; only an approved, unexpired one receives traffic."""

    __tablename__ = "provider_reviews"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    data_retention_days: Mapped[int | None] = mapped_column(Integer)
    training_opt_out: Mapped[bool] = mapped_column(Boolean, default=False)
    certifications: Mapped[list[str]] = mapped_column(JSON, default=list)
    allowed_regions: Mapped[list[str]] = mapped_column(JSON, default=list)
    data_class: Mapped[str] = mapped_column(String(20))  # ceiling
    reviewer: Mapped[str | None] = mapped_column(String(200))
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    notes: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(10), default="api")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    change_seq: Mapped[int] = mapped_column(BigInteger, index=True, default=0)


class ApprovalRequest(Base):
    """A change that needs a second person: who asked, who decided, and when."""

    __tablename__ = "approval_requests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(300), index=True)
    change: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(String(1000))
    state: Mapped[str] = mapped_column(String(20), index=True)
    requested_by: Mapped[str] = mapped_column(String(200))
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    decided_by: Mapped[str | None] = mapped_column(String(200))
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    decision_note: Mapped[str | None] = mapped_column(String(1000))


class KillSwitch(Base):
    """An emergency stop of one model, deployment, provider, key or team; active until lifted."""

    __tablename__ = "kill_switches"
    __table_args__ = (Index("ix_kill_switches_target", "target_type", "target"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    target_type: Mapped[str] = mapped_column(String(20))
    target: Mapped[str] = mapped_column(String(300))
    reason: Mapped[str] = mapped_column(String(1000))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lifted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    lifted_by: Mapped[str | None] = mapped_column(String(200))
    lift_reason: Mapped[str | None] = mapped_column(String(1000))
    change_seq: Mapped[int] = mapped_column(BigInteger, index=True, default=0)


class AuditHead(Base):
    """One row: the sequence number and hash of the newest audit record (also the writers' lock)."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditRecord(Base):
    """One admin action or policy decision. Never holds prompt or answer content."""

    __tablename__ = "audit_records"
    # Written at gateway rates, so every index costs (migration 0009): seq is SQLite's rowid,
    # request ids are time-ordered (appended at the index's end), and the hash needs no index.
    __table_args__ = (Index("ix_audit_records_kind_seq", "kind", "seq"),)

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    kind: Mapped[str] = mapped_column(String(20))  # "admin" or "decision"
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str | None] = mapped_column(String(300))
    outcome: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(String(1000))
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    policy_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
