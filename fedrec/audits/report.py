"""The audit record people read: ``audit.jsonl`` (one line per round) → ``audit.html``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from fedrec.plots import embedded_png, pyplot

ITEM_METRICS = ("coverage", "gini", "entropy", "arp", "aplt", "pop_rsp")


def read_audits(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "audit.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no audit log; run a federated simulation with audit.enabled (the default)"
        )
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _gap_figure(audits: list[dict[str, Any]], metric: str) -> str:
    attributes = sorted(audits[-1]["groups"])
    figure, axes = pyplot().subplots(
        1, len(attributes), figsize=(3.6 * len(attributes), 3.2), squeeze=False
    )
    rounds = [a["round"] for a in audits]
    for axis, attribute in zip(axes[0], attributes, strict=True):
        gaps = [a["groups"].get(attribute, {}).get(metric) for a in audits]
        xs = [r for r, g in zip(rounds, gaps, strict=True) if g]
        points = [g for g in gaps if g]
        axis.plot(xs, [g["gap"] for g in points], marker=".", label="gap")
        axis.fill_between(
            xs, [g["ci"][0] for g in points], [g["ci"][1] for g in points], alpha=0.25, label="CI"
        )
        axis.set(title=attribute, xlabel="round", ylabel=f"{metric} gap (max − min group)")
    axes[0][0].legend(loc="upper left")
    return embedded_png(figure, f"{metric} group gaps over rounds")


def _item_figure(audits: list[dict[str, Any]]) -> str:
    figure, axes = pyplot().subplots(2, 3, figsize=(11, 5.5))
    rounds = [a["round"] for a in audits]
    for axis, name in zip(axes.flat, ITEM_METRICS, strict=True):
        key = next(k for k in audits[-1]["items"] if k.startswith(name))
        axis.plot(rounds, [a["items"][key] for a in audits], marker=".")
        axis.set(title=key, xlabel="round")
    return embedded_png(figure, "item-side metrics over rounds")


def _calibration_figure(audits: list[dict[str, Any]]) -> str:
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(11, 3.5))
    rounds = [a["round"] for a in audits if "calibration" in a]
    left.plot(rounds, [a["calibration"]["kl"] for a in audits if "calibration" in a], marker=".")
    left.set(title="calibration KL (mean over users)", xlabel="round")
    final = audits[-1]["calibration"]["by_group"]
    labels = [f"{a}={g}" for a in sorted(final) for g in sorted(final[a])]
    values = [final[a][g] for a in sorted(final) for g in sorted(final[a])]
    right.barh(labels, values)
    right.tick_params(axis="y", labelsize=6)
    right.set(title=f"calibration KL by group, round {audits[-1]['round']}")
    return embedded_png(figure, "calibration")


def _group_table(record: dict[str, Any], metric: str) -> str:
    rows = []
    for attribute, by_metric in sorted(record["groups"].items()):
        gap = by_metric[metric]
        cells = ", ".join(
            f"{html.escape(g)} {v:.4f} (n={gap['counts'][g]})" for g, v in gap["means"].items()
        )
        rows.append(
            f"<tr><td>{html.escape(attribute)}</td><td>{gap['gap']:.4f}</td>"
            f"<td>{gap['ci'][0]:.4f}–{gap['ci'][1]:.4f}</td><td>{gap['ratio']:.3f}</td>"
            f"<td>{html.escape(gap['best'])} / {html.escape(gap['worst'])}</td><td>{cells}</td></tr>"
        )
    return (
        f"<h3>{html.escape(metric)} by group, round {record['round']}</h3><table><tr><th>attribute"
        "</th><th>gap</th><th>CI</th><th>min/max</th><th>best / worst</th><th>group means</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def audit_html(audits: list[dict[str, Any]]) -> str:
    last = audits[-1]
    metrics = list(next(iter(last["groups"].values()), {}).keys())
    breaches = [(a["round"], b) for a in audits for b in a.get("breaches", [])]
    breach_html = (
        "<ul>" + "".join(f"<li>round {r}: {html.escape(b)}</li>" for r, b in breaches) + "</ul>"
        if breaches
        else "<p>No threshold was breached.</p>"
    )
    items = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in last["items"].items()
    )
    parts = [
        f"<p>{len(audits)} audited rounds; mode <b>{html.escape(last.get('mode', 'server'))}</b>, "
        f"stage {html.escape(last['stage'])}, top-{last['k']}"
        + (f", re-ranked: {html.escape(json.dumps(last['rerank']))}" if last.get("rerank") else "")
        + ". Gap = largest minus smallest group mean; CI = basic bootstrap interval of the gap.</p>",
        "<h2>Threshold breaches</h2>" + breach_html,
        "<h2>User side</h2>",
        *(_gap_figure(audits, metric) for metric in metrics),
        *(_group_table(last, metric) for metric in metrics),
        "<h2>Item side</h2>",
        _item_figure(audits),
        f"<table><tr><th>metric, round {last['round']}</th><th>value</th></tr>{items}</table>",
    ]
    if "calibration" in last:
        parts += ["<h2>Calibration (Steck 2018)</h2>", _calibration_figure(audits)]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fedrec audit report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:90%}}table{{border-collapse:collapse}}</style>
</head><body><h1>Bias and fairness audit</h1>{"".join(parts)}</body></html>"""


def write_audit_report(run_dir: Path) -> Path:
    """``audit.html`` from the run's ``audit.jsonl``."""
    path = run_dir / "audit.html"
    path.write_text(audit_html(read_audits(run_dir)), encoding="utf-8")
    return path
