"""Privacy budget reports: ``privacy.json`` and a self-contained ``privacy.html``.

Every number comes from the ledger (``PrivacyLedger.epsilon``); nothing is recomputed another way.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from fedrec.plots import embedded_png, pyplot
from fedrec.privacy.ledger import UNIT_MEANING, PrivacyLedger


def privacy_summary(ledger: PrivacyLedger) -> dict[str, Any]:
    parties: dict[str, Any] = {}
    for party in ledger.parties():
        events = [e for e in ledger.events if e.party == party]
        delta = ledger.delta(party)
        parties[party] = {
            "unit": sorted({e.unit for e in events}),
            "mechanism": sorted({e.mechanism for e in events}),
            "delta": delta,
            "epsilon": ledger.epsilon(party, delta),
            "epsilon_by_round": ledger.epsilon_by_round(party, delta),
            "rounds": len({e.round for e in events}),
        }
    clients = [v["epsilon"] for k, v in parties.items() if k.startswith("client:")]
    mechanisms = Counter(
        (
            e.mechanism,
            e.unit,
            round(e.noise_multiplier, 4),
            round(e.sample_rate, 6),
            e.steps,
            e.clip_norm,
            e.delta,
        )
        for e in ledger.events
    )
    return {
        "accountant": ledger.accountant,
        "units": {unit: UNIT_MEANING[unit] for unit in sorted({e.unit for e in ledger.events})},
        "federation": parties.get("server"),
        "clients": {
            "count": len(clients),
            "epsilon_min": min(clients) if clients else None,
            "epsilon_median": statistics.median(clients) if clients else None,
            "epsilon_max": max(clients) if clients else None,
        },
        "parties": parties,
        "mechanisms": [
            {
                "mechanism": m,
                "unit": u,
                "noise_multiplier": s,
                "sample_rate": q,
                "steps": n,
                "clip_norm": c,
                "delta": d,
                "events": count,
            }
            for (m, u, s, q, n, c, d), count in sorted(mechanisms.items())
        ],
    }


def _figure(summary: dict[str, Any]) -> str:
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    federation = summary["federation"]
    if federation:
        rounds = sorted(int(r) for r in federation["epsilon_by_round"])
        left.plot(
            rounds,
            [federation["epsilon_by_round"][r] for r in rounds],
            marker="o",
            label="federation (user-level)",
        )
    clients = {k: v for k, v in summary["parties"].items() if k.startswith("client:")}
    if clients:
        by_round: dict[int, list[float]] = {}
        for party in clients.values():
            for r, eps in party["epsilon_by_round"].items():
                by_round.setdefault(int(r), []).append(eps)
        rounds = sorted(by_round)
        left.plot(
            rounds,
            [max(by_round[r]) for r in rounds],
            marker=".",
            label="clients: max (record-level)",
        )
        left.plot(
            rounds,
            [statistics.median(by_round[r]) for r in rounds],
            marker=".",
            label="clients: median",
        )
        right.hist([p["epsilon"] for p in clients.values()], bins=20)
    left.set(xlabel="round", ylabel="ε", title="ε over rounds")
    left.legend(loc="upper left")
    right.set(xlabel="final ε", ylabel="clients", title="ε across clients (record-level)")
    return embedded_png(figure, "ε plots")


def _html(summary: dict[str, Any]) -> str:
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(m[k]))}</td>"
            for k in (
                "mechanism",
                "unit",
                "noise_multiplier",
                "sample_rate",
                "steps",
                "clip_norm",
                "delta",
                "events",
            )
        )
        + "</tr>"
        for m in summary["mechanisms"]
    )
    units = "".join(
        f"<li><b>{html.escape(u)}</b>: {html.escape(t)}</li>" for u, t in summary["units"].items()
    )
    federation = summary["federation"]
    headline = (
        f"Federation (user-level): ε = {federation['epsilon']:.3f} at δ = {federation['delta']:.2g}"
        if federation
        else "No user-level (DP-FedAvg) release in this run."
    )
    clients = summary["clients"]
    if clients["count"]:
        headline += (
            f"<br>Clients (record-level), {clients['count']} with releases: ε min {clients['epsilon_min']:.3f}, "
            f"median {clients['epsilon_median']:.3f}, max {clients['epsilon_max']:.3f}"
        )
    figure = _figure(summary) if summary["parties"] else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fedrec privacy report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px}}table{{border-collapse:collapse}}</style>
</head><body><h1>Privacy budget report</h1><p>{headline}</p>
<p>Accountant: {html.escape(summary["accountant"])} (Opacus). What each ε protects:</p><ul>{units}</ul>
{figure}<h2>Every mechanism used</h2>
<table><tr><th>mechanism</th><th>unit</th><th>σ</th><th>q</th><th>steps</th><th>clip norm</th><th>δ</th><th>events</th></tr>{rows}</table>
</body></html>"""


def write_privacy_report(ledger: PrivacyLedger, run_dir: Path) -> tuple[Path, Path]:
    summary = privacy_summary(ledger)
    json_path, html_path = run_dir / "privacy.json", run_dir / "privacy.html"
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    html_path.write_text(_html(summary), encoding="utf-8")
    return json_path, html_path
