"""The deployment-faithful audit: clients send sums, the server adds them up.

A client evaluates the global model on its own users' held-out items and returns, in its
evaluate reply, only sufficient statistics: per user group the count, sum and sum of squares of
each metric and the calibration KL, its top-K exposure histogram (optionally with Gaussian
noise, since a top-K list is personal data) and its head/tail availability counts for PopRSP.
The server turns the sums into the same record as the server-side audit; group gaps get a
parametric bootstrap interval (each group mean drawn from its normal approximation) because
per-user values never leave the device.

Item popularity (for ARP, APLT, PopRSP) and the activity cut points (terciles, top 5%) are
population statistics the server would send down; in the simulation they come from the
population, as in the server-side audit.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from fedrec.audits import metrics as m
from fedrec.audits.audit import AuditConfig, AuditContext, _gap_record, breaches

Sums = dict[str, float | list[float]]
PREFIX = "audit/"


def client_sums(
    per_user: dict[str, np.ndarray],
    top_items: np.ndarray,
    context: AuditContext,
    config: AuditConfig,
    rng: np.random.Generator,
) -> Sums:
    """One client's audit statistics for its users (``context``: its own split, with group
    labels: ``AuditContext.from_parts``)."""
    top_k = top_items[:, : config.k]
    out: Sums = {}
    seen = [context.split.history(u, context.stage)[0] for u in range(context.split.num_users)]
    kl = (
        np.array(
            [
                m.calibration_kl(h, top_k[u], context.genres, config.calibration_alpha)
                for u, h in enumerate(seen)
            ]
        )
        if context.genres is not None
        else None
    )
    for attribute, labels in context.groups.items():
        for group in sorted(set(labels.tolist()) - {""}):
            members = labels == group
            key = f"{PREFIX}{attribute}={group}"
            out[f"{key}|count"] = float(members.sum())
            for metric in config.metrics:
                values = per_user[metric][members]
                out[f"{key}|{metric}/sum"] = float(values.sum())
                out[f"{key}|{metric}/sumsq"] = float((values**2).sum())
            if kl is not None:
                known = members & ~np.isnan(kl)
                out[f"{key}|kl/sum"] = float(kl[known].sum())
                out[f"{key}|kl/count"] = float(known.sum())
    if kl is not None:
        out[f"{PREFIX}kl/sum"] = float(np.nansum(kl))
        out[f"{PREFIX}kl/count"] = float((~np.isnan(kl)).sum())
    exposure = m.exposure_counts(top_k, context.split.num_items).astype(np.float64)
    if config.exposure_noise > 0:
        exposure += rng.normal(0.0, config.exposure_noise, size=exposure.shape)
    out[f"{PREFIX}exposure"] = exposure.tolist()
    tail = context.tail
    available_head = available_tail = 0.0
    for history in seen:
        unique = np.unique(history)
        seen_tail = int(tail[unique].sum())
        available_tail += int(tail.sum()) - seen_tail
        available_head += int((~tail).sum()) - (len(unique) - seen_tail)
    out[f"{PREFIX}available-head"] = available_head
    out[f"{PREFIX}available-tail"] = available_tail
    out[f"{PREFIX}users"] = float(len(top_k))
    out[f"{PREFIX}clients"] = 1.0
    out[f"{PREFIX}slots"] = float((top_k >= 0).sum())
    return out


def add_sums(parts: list[Sums]) -> Sums:
    """Element-wise sum of client statistics (lists: the exposure histogram)."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, list):
                total[key] = np.add(total.get(key, 0.0), value)
            else:
                total[key] = total.get(key, 0.0) + value
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in total.items()}


def audit_from_sums(
    sums: Sums, context: AuditContext, config: AuditConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """The audit record from the summed client statistics; ``context`` supplies item
    popularity and the long tail (server knowledge), not user data."""
    by_group: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for key, value in sums.items():
        if key.startswith(PREFIX) and "=" in key:
            attribute, _, rest = key[len(PREFIX) :].partition("=")
            group, _, stat = rest.partition("|")
            by_group[attribute].setdefault(group, {})[stat] = float(value)  # type: ignore[arg-type]
    groups: dict[str, Any] = {}
    calibration_groups: dict[str, dict[str, float]] = {}
    for attribute, stats in by_group.items():
        labels = sorted(g for g, s in stats.items() if s["count"] > 0)
        if any("kl/count" in stats[g] for g in labels):
            calibration_groups[attribute] = {
                g: stats[g]["kl/sum"] / stats[g]["kl/count"]
                for g in labels
                if stats[g]["kl/count"] > 0
            }
        compared = [g for g in labels if stats[g]["count"] >= config.min_group_size]
        if len(compared) < 2:
            continue
        small = {g: int(stats[g]["count"]) for g in labels if g not in compared}
        groups[attribute] = {
            metric: _gap_record(_gap_from_moments(stats, compared, metric, config, rng, small))
            for metric in config.metrics
        }
    # Noisy histograms are summed unclipped (the noise is zero-mean, so sums stay unbiased) for
    # ARP, APLT and PopRSP. Coverage, Gini and entropy need to know which items were shown at
    # all: an item counts only above three standard deviations of the summed noise (else
    # noise alone would make never-shown items look covered); shares are clipped to [0, 1].
    exposure = np.asarray(sums[f"{PREFIX}exposure"], dtype=np.float64)
    clients = float(sums[f"{PREFIX}clients"])  # type: ignore[arg-type]
    floor = 3 * config.exposure_noise * np.sqrt(clients) if config.exposure_noise > 0 else 0.5
    shown = np.where(exposure > floor, exposure, 0.0)
    slots = float(sums[f"{PREFIX}slots"])  # type: ignore[arg-type]
    shown_tail = float(np.clip((exposure * context.tail).sum(), 0.0, slots))
    rate = np.array(
        [
            (slots - shown_tail) / max(float(sums[f"{PREFIX}available-head"]), 1.0),  # type: ignore[arg-type]
            shown_tail / max(float(sums[f"{PREFIX}available-tail"]), 1.0),  # type: ignore[arg-type]
        ]
    )
    items = {
        f"coverage@{config.k}": m.item_coverage(shown),
        "gini": m.gini_index(shown),
        "entropy": m.shannon_entropy(shown),
        # With K items per user, the mean over users of per-list means is the exposure-weighted
        # mean over slots.
        "arp": float((exposure * context.popularity).sum() / max(slots, 1.0)),
        "aplt": shown_tail / max(slots, 1.0),
        "pop_rsp": float(rate.std() / rate.mean()) if rate.mean() > 0 else float("nan"),
    }
    record: dict[str, Any] = {
        "k": config.k,
        "stage": context.stage,
        "groups": groups,
        "items": items,
    }
    if f"{PREFIX}kl/count" in sums:
        kl_sum, kl_count = (float(sums[f"{PREFIX}kl/{s}"]) for s in ("sum", "count"))  # type: ignore[arg-type]
        record["calibration"] = {"kl": kl_sum / max(kl_count, 1.0), "by_group": calibration_groups}
    record["breaches"] = breaches(record, config)
    return record


def _gap_from_moments(
    stats: dict[str, dict[str, float]],
    labels: list[str],
    metric: str,
    config: AuditConfig,
    rng: np.random.Generator,
    small: dict[str, int],
) -> m.GroupGap:
    counts = np.array([stats[g]["count"] for g in labels])
    means = np.array([stats[g][f"{metric}/sum"] for g in labels]) / counts
    variances = np.maximum(
        np.array([stats[g][f"{metric}/sumsq"] for g in labels]) / counts - means**2, 0.0
    )
    draws = rng.normal(
        means, np.sqrt(variances / counts), size=(config.bootstrap_resamples, len(labels))
    )
    return m.gap_from_draws(
        labels, means, [int(c) for c in counts], draws, config.confidence, small
    )
