"""Bias and fairness audits of the global model: metrics, per-round audit, re-ranking, reports."""

from fedrec.audits.audit import (
    AuditConfig,
    AuditContext,
    RerankConfig,
    audit,
    audit_line,
    audit_round,
    breaches,
)

__all__ = [
    "AuditConfig",
    "AuditContext",
    "RerankConfig",
    "audit",
    "audit_line",
    "audit_round",
    "breaches",
]
