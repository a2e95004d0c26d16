"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018)."""

from fedrec.models.sasrec.model import SASRec, SASRecConfig

__all__ = ["SASRec", "SASRecConfig"]
