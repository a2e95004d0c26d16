"""Differential privacy: pure accounting functions, the privacy ledger and budgets."""

from fedrec.privacy.accounting import epsilon, make_accountant
from fedrec.privacy.ledger import PrivacyBudget, PrivacyEvent, PrivacyLedger

__all__ = ["PrivacyBudget", "PrivacyEvent", "PrivacyLedger", "epsilon", "make_accountant"]
