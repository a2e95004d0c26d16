"""The on-device client SDK: ``fedrec.device.open(folder, key)`` (see ``fedrec.device.client``)."""

from fedrec.device.client import DeviceClient, ParticipationPolicy, Recommendation, open
from fedrec.device.store import EncryptedStore, key_from_passphrase

__all__ = [
    "DeviceClient",
    "EncryptedStore",
    "ParticipationPolicy",
    "Recommendation",
    "key_from_passphrase",
    "open",
]
