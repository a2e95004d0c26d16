"""Privacy budget reports: ``privacy.json`` and a self-contained ``privacy.html``.

Every ε comes from the ledger (``PrivacyLedger.epsilon``); nothing is recomputed another way.
The page opens with what a person needs first: per protected unit, who is protected from whom,
ε with its δ, the sampling and the accountant; then budgets and refusals, what is not covered,
cumulative ε over rounds, and every mechanism used.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from fedrec.plots import embedded_png, pyplot
from fedrec.privacy.accounting import WITHOUT_REPLACEMENT_ACCOUNTANT
from fedrec.privacy.ledger import ADJACENCY, UNIT_MEANING, PrivacyLedger

ACCOUNTANT_NAMES = {
    "rdp": "Opacus RDP accountant",
    "prv": "Opacus PRV accountant",
    WITHOUT_REPLACEMENT_ACCOUNTANT: "dp_accounting RDP, sampling without replacement",
}
PROTECTED_FROM = {
    "server": (
        "anyone who sees the global models: other clients and the models' users. Not the "
        "server, which sees each sampled client's clipped update before the noise."
    ),
    "client": (
        "the server and everyone after it: the noise is added on the device, from the "
        "device's private randomness, before anything leaves it."
    ),
    "server-view": (
        "the server itself: it sees only SecAgg+ sums whose noise the clients added; "
        "without amplification by sampling, since the server knows who took part."
    ),
}


def fmt_epsilon(value: float | None) -> str:
    if value is None:
        return "–"
    return "∞" if value == float("inf") else f"{value:.2f}"


def fmt_delta(value: float) -> str:
    return f"{value:.1e}".replace("e-0", "e-")


def _sampling(events: list[Any]) -> str:
    first = events[0]
    if first.sampling == "without-replacement":
        cohort = round(first.sample_rate * first.population)
        return f"fixed cohort of {cohort} of {first.population}, without replacement"
    rates = sorted({round(e.sample_rate, 4) for e in events})
    shown = f"q = {rates[0]}" if len(rates) == 1 else f"q = {rates[0]}–{rates[-1]}"
    return f"Poisson, {shown}"


def _cumulative(parties: dict[str, Any], rounds: list[int]) -> dict[str, list[float]]:
    """Per round, the max and median over clients of their running ε (a client's ε carries
    over the rounds it sat out)."""
    running: dict[str, float] = {}
    out: dict[str, list[float]] = {"max": [], "median": []}
    for r in rounds:
        for party, facts in parties.items():
            if r in facts["epsilon_by_round"]:
                running[party] = facts["epsilon_by_round"][r]
        values = list(running.values()) or [0.0]
        out["max"].append(max(values))
        out["median"].append(statistics.median(values))
    return out


def _device_guarantee(
    ledger: PrivacyLedger, parties: dict[str, Any], disclosures: dict[str, Any]
) -> dict[str, Any]:
    """The clients' own guarantee: record-level DP-SGD and/or their noised audit histograms."""
    events = [e for e in ledger.events if e.party.startswith("client:")]
    mechanisms = {e.mechanism for e in events}
    units = sorted({e.unit for e in events})
    unit = next((u for u in units if u != "user"), units[0])
    epsilons = [v["epsilon"] for v in parties.values()]
    if "dp-sgd" in mechanisms:
        level = "record-level (DP-SGD on each device)"
        sampling = "Poisson sampling of the device's records at every step"
        if "gaussian" in mechanisms:
            level += ", with its noised audit histograms"
            sampling += "; audit histograms: every audited round"
    else:
        level = "each device's noised audit histograms (no DP training)"
        sampling = "every audited round, no sampling"
    return {
        "level": level,
        "unit": unit,
        "meaning": UNIT_MEANING[unit],
        "protected_from": PROTECTED_FROM["client"],
        "epsilon": max(epsilons),
        "epsilon_median": statistics.median(epsilons),
        "delta": max(v["delta"] for v in parties.values()),
        "sampling": sampling,
        "adjacency": ADJACENCY["poisson"],
        "accountant": ", ".join(
            ACCOUNTANT_NAMES[a] for a in sorted({v["accountant"] for v in parties.values()})
        ),
        "budget": disclosures.get("budgets", {}).get("client_epsilon"),
    }


def privacy_summary(
    ledger: PrivacyLedger, disclosures: dict[str, Any] | None = None
) -> dict[str, Any]:
    disclosures = disclosures or {}
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
            "accountant": events[0].accountant,
            "sampling": _sampling(events),
        }
    client_parties = {k: v for k, v in parties.items() if k.startswith("client:")}
    clients = [v["epsilon"] for v in client_parties.values()]
    guarantees: list[dict[str, Any]] = []
    server = parties.get("server")
    if server is not None:
        server_events = [e for e in ledger.events if e.party == "server"]
        guarantees.append(
            {
                "level": "user-level (DP-FedAvg)",
                "unit": "user",
                "meaning": UNIT_MEANING["user"],
                "protected_from": PROTECTED_FROM["server"],
                "epsilon": server["epsilon"],
                "delta": server["delta"],
                "sampling": server["sampling"],
                "adjacency": ADJACENCY[server_events[0].sampling],
                "accountant": ACCOUNTANT_NAMES[server["accountant"]],
                "budget": disclosures.get("budgets", {}).get("federation_epsilon"),
            }
        )
    if clients:
        guarantees.append(_device_guarantee(ledger, client_parties, disclosures))
    viewed = {k: v for k, v in parties.items() if k.startswith("server-view:")}
    if viewed:
        guarantees.append(
            {
                "level": "user-level against the server (SecAgg+, distributed noise)",
                "unit": "user",
                "meaning": UNIT_MEANING["user"],
                "protected_from": PROTECTED_FROM["server-view"],
                "epsilon": max(v["epsilon"] for v in viewed.values()),
                "epsilon_median": statistics.median(v["epsilon"] for v in viewed.values()),
                "delta": max(v["delta"] for v in viewed.values()),
                "sampling": "none (each round the user joined)",
                "adjacency": ADJACENCY["poisson"],
                "accountant": ACCOUNTANT_NAMES[next(iter(viewed.values()))["accountant"]],
                "budget": None,
            }
        )
    mechanisms = Counter(
        (
            e.mechanism,
            e.unit,
            round(e.noise_multiplier, 4),
            round(e.sample_rate, 6),
            e.steps,
            e.clip_norm,
            e.delta,
            e.accountant,
        )
        for e in ledger.events
    )
    rounds = sorted({e.round for e in ledger.events})
    return {
        "guarantees": guarantees,
        "not_covered": disclosures.get("not_covered", []),
        "reproducible_noise": disclosures.get("reproducible_noise", False),
        "refused_client_rounds": disclosures.get("refused_client_rounds"),
        "units": {unit: UNIT_MEANING[unit] for unit in sorted({e.unit for e in ledger.events})},
        "federation": server,
        "clients": {
            "count": len(clients),
            "epsilon_min": min(clients) if clients else None,
            "epsilon_median": statistics.median(clients) if clients else None,
            "epsilon_max": max(clients) if clients else None,
            "budget": disclosures.get("budgets", {}).get("client_epsilon"),
            "cumulative_by_round": {
                "rounds": rounds,
                **_cumulative(client_parties, rounds),
            }
            if clients
            else None,
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
                "accountant": a,
                "events": count,
            }
            for (m, u, s, q, n, c, d, a), count in sorted(mechanisms.items())
        ],
    }


def _figure(summary: dict[str, Any]) -> str:
    federation, clients = summary["federation"], summary["clients"]
    cumulative = clients["cumulative_by_round"]
    if cumulative:
        figure, (left, right) = pyplot().subplots(1, 2, figsize=(11, 3.8))
    else:  # no client released anything: no distribution to show
        figure, left = pyplot().subplots(1, 1, figsize=(6, 3.8))
    if federation:
        rounds = sorted(int(r) for r in federation["epsilon_by_round"])
        by_round = {int(r): v for r, v in federation["epsilon_by_round"].items()}
        left.plot(rounds, [by_round[r] for r in rounds], label="federation (user-level)")
        for guarantee in summary["guarantees"]:
            if guarantee["unit"] == "user" and guarantee["budget"]:
                left.axhline(guarantee["budget"], ls=":", color="C0", label="federation budget")
    if cumulative:
        left.plot(cumulative["rounds"], cumulative["max"], label="clients: max (record-level)")
        left.plot(cumulative["rounds"], cumulative["median"], label="clients: median")
        if clients["budget"]:
            left.axhline(clients["budget"], ls="--", color="C1", label="client budget")
        finals = [p["epsilon"] for k, p in summary["parties"].items() if k.startswith("client:")]
        right.hist(finals, bins=20)
        right.set(xlabel="ε at the end of the run", ylabel="clients", title="ε across clients")
    left.set(xlabel="round", ylabel="cumulative ε", title="ε so far, after each round")
    left.legend(loc="upper left", fontsize=8)
    return embedded_png(figure, "cumulative ε over rounds and ε across clients")


def _guarantee_rows(summary: dict[str, Any]) -> str:
    rows = []
    for g in summary["guarantees"]:
        spread = (
            f" (median {fmt_epsilon(g['epsilon_median'])}, max over clients)"
            if "epsilon_median" in g
            else ""
        )
        budget = f"<br><small>budget {fmt_epsilon(g['budget'])}</small>" if g["budget"] else ""
        rows.append(
            "<tr>"
            f"<td><b>{html.escape(g['level'])}</b><br><small>{html.escape(g['meaning'])}</small></td>"
            f"<td>{html.escape(g['protected_from'])}</td>"
            f"<td class=num><b>ε = {fmt_epsilon(g['epsilon'])}</b>{spread}{budget}</td>"
            f"<td class=num>δ = {fmt_delta(g['delta'])}</td>"
            f"<td>{html.escape(g['sampling'])}; adjacency: {html.escape(g['adjacency'])}<br>"
            f"<small>{html.escape(g['accountant'])}</small></td>"
            "</tr>"
        )
    return "".join(rows)


def _html(summary: dict[str, Any]) -> str:
    mechanism_rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(m[k]))}</td>"
            for k in ("mechanism", "unit", "noise_multiplier", "sample_rate", "steps", "clip_norm")
        )
        + f"<td>{fmt_delta(m['delta'])}</td><td>{html.escape(m['accountant'])}</td>"
        + f"<td>{m['events']}</td></tr>"
        for m in summary["mechanisms"]
    )
    if summary["guarantees"]:
        headline = (
            "<table class=head><tr><th>guarantee and what it protects</th><th>protected from"
            "</th><th>ε</th><th>δ</th><th>sampling and accountant</th></tr>"
            f"{_guarantee_rows(summary)}</table>"
        )
    else:
        headline = "<p class=warn>No differentially private release in this run: no guarantee.</p>"
    clients = summary["clients"]
    facts = []
    if clients["count"]:
        facts.append(
            f"{clients['count']} clients released something; ε min {fmt_epsilon(clients['epsilon_min'])}, "
            f"median {fmt_epsilon(clients['epsilon_median'])}, max {fmt_epsilon(clients['epsilon_max'])}"
            + (
                f" against a budget of {fmt_epsilon(clients['budget'])}"
                if clients["budget"]
                else ""
            )
        )
    lifetime = (summary.get("disclosures") or {}).get("device_lifetime")
    if clients["count"]:
        facts.append("Client figures above count this run's releases, as the server saw them.")
    if lifetime:
        facts.append(
            f"On the {lifetime['devices']} simulated devices' own ledgers (every run they "
            f"joined, what their budgets count): ε max {fmt_epsilon(lifetime['epsilon_max'])}, "
            f"median {fmt_epsilon(lifetime['epsilon_median'])}."
        )
    if summary["refused_client_rounds"] is not None and clients.get("budget"):
        facts.append(
            f"{summary['refused_client_rounds']} client-rounds refused to train (budget reached)"
        )
    uncovered = summary["not_covered"] or [
        "Nothing: every release a client makes is in the ledger."
    ]
    warn = (
        "<p class=warn><b>Reproducible mode:</b> the noise can be regenerated from the config's "
        "seed; the figures below hold only against someone who does not know it.</p>"
        if summary["reproducible_noise"]
        else ""
    )
    audit = _audit_section(summary.get("privacy_audit"))
    ledger_sections = (
        f"<h2>ε over the run</h2>{_figure(summary)}<h2>Every mechanism used</h2><table><tr>"
        "<th>mechanism</th><th>unit</th><th>σ</th><th>q</th><th>steps</th><th>clip norm</th>"
        f"<th>δ</th><th>accountant</th><th>events</th></tr>{mechanism_rows}</table>"
        if summary["parties"]
        else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fedrec privacy report</title>
<style>body{{font-family:sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;line-height:1.4}}
td,th{{border:1px solid #ccc;padding:6px 8px;vertical-align:top;text-align:left}}table{{border-collapse:collapse;width:100%}}
.num{{white-space:nowrap}}.head th{{background:#eef3f8}}.warn{{background:#fff3cd;padding:8px 12px;border-left:4px solid #e0a800}}
img{{max-width:100%}}small{{color:#555}}</style>
</head><body><h1>Privacy report</h1>{warn}{headline}
<ul>{"".join(f"<li>{html.escape(f)}</li>" for f in facts)}</ul>
<h2>Not covered by these guarantees</h2><ul>{"".join(f"<li>{html.escape(u)}</li>" for u in uncovered)}</ul>
{audit}{ledger_sections}
</body></html>"""


def _audit_section(audit: dict[str, Any] | None) -> str:
    if not audit:
        return ""
    m = audit["membership"]
    lo, hi = m["auc_interval"]
    rows = [
        f"Membership inference ({html.escape(audit['score'])}): AUC <b>{m['auc']:.3f}</b> "
        f"(95% bootstrap interval {lo:.3f}–{hi:.3f}), permutation p = {m['p_value']:.3g}, "
        f"{m['members']} members vs {m['nonmembers']} held-out users.",
        html.escape(m["bound"]["verdict"]),
        f"With these users even a perfect attack certifies at most ε ≈ "
        f"{audit.get('largest_certifiable_epsilon', float('nan')):.2f}: a larger claim cannot "
        "be contradicted by this audit.",
    ]
    if "canaries" in audit:
        c = audit["canaries"]
        rows.append(
            f"Canary exposure: median {c['exposure_median']:.2f} bits of "
            f"{c['max_possible_exposure']:.2f} possible ({c['count']} canaries, each against "
            f"{c['references']} random sequences)."
        )
    style = " class=warn" if m["bound"]["contradicts"] else ""
    items = "".join(f"<li>{r}</li>" for r in rows)
    return f"<h2>Empirical privacy audit</h2><div{style}><ul>{items}</ul></div>"


def rewrite_privacy_report(run_dir: Path) -> Path | None:
    """privacy.html again from privacy.json, with the privacy audit's results when present;
    None for a privacy.json written before the report had guarantees (rebuild it from the
    checkpoint with ``fedrec privacy-report``)."""
    summary = json.loads((run_dir / "privacy.json").read_text(encoding="utf-8"))
    if "guarantees" not in summary:
        return None
    summary["privacy_audit"] = _read_audit(run_dir)
    summary["clients"]["cumulative_by_round"] = summary["clients"].get("cumulative_by_round")
    for party in summary["parties"].values():
        party["epsilon_by_round"] = {int(k): v for k, v in party["epsilon_by_round"].items()}
    path = run_dir / "privacy.html"
    path.write_text(_html(summary), encoding="utf-8")
    return path


def _read_audit(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "privacy_audit.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def write_privacy_report(
    ledger: PrivacyLedger, run_dir: Path, disclosures: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """``disclosures``: budgets, refusals and the releases outside the ledger
    (``fedrec.federation.privacy_disclosures``); kept in ``privacy.json`` for later rewrites."""
    if disclosures is None and (run_dir / "privacy.json").exists():
        disclosures = json.loads((run_dir / "privacy.json").read_text(encoding="utf-8")).get(
            "disclosures"
        )
    summary = privacy_summary(ledger, disclosures)
    summary["disclosures"] = disclosures
    summary["privacy_audit"] = _read_audit(run_dir)
    json_path, html_path = run_dir / "privacy.json", run_dir / "privacy.html"
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    html_path.write_text(_html(summary), encoding="utf-8")
    return json_path, html_path
