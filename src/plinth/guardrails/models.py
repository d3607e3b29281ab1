"""The guardrail_events table: one row per finding acted on. Never the matched value or its text."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from plinth.storage import Base, utcnow


class GuardrailEventRow(Base):
    __tablename__ = "guardrail_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    stage: Mapped[str] = mapped_column(String(10))  # input | output
    profile: Mapped[str] = mapped_column(String(100))
    scanner: Mapped[str] = mapped_column(String(100))
    rule: Mapped[str] = mapped_column(String(200), index=True)
    type: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(20))  # flag | mask | pseudonymize | block
    score: Mapped[float] = mapped_column(Float)
    location: Mapped[str] = mapped_column(String(200))  # "messages[2].content": where, not what
    data_class: Mapped[str | None] = mapped_column(String(20))
    key_id: Mapped[str | None] = mapped_column(String(200), index=True)
    team_id: Mapped[str | None] = mapped_column(String(40), index=True)
    model: Mapped[str | None] = mapped_column(String(200))
