"""Flower ServerApp: a thin driver of the federation's round loop (``server.rounds``) over
Flower's grid, in a simulation or a deployment.

The run's facts come from the run config: ``config`` (the experiment YAML, or
``$FEDREC_CONFIG``), ``run-dir``, ``resume`` (or ``$FEDREC_RESUME=1``), ``deployment``
(true: the SuperNodes hold their own stores; otherwise this simulation writes each simulated
device's store from the population before the first round) and ``enrolment`` (a deployment
with SuperNode auth: the file ``fedrec server register`` keeps, mapping each device's
authenticated node ID to its client). Per round it appends one line to
``metrics.jsonl`` and one to ``audit.jsonl`` and rewrites ``checkpoint.pt`` atomically (model,
privacy ledger, round), so ``resume`` continues all of them; at the end it writes
``results.json``, the privacy report and the audit report.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.federation.layout import resolve_config_path, resolve_run_dir
from fedrec.population import load_population
from server.enrolment import load_enrolment
from server.rounds import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    population = load_population(resolve_config_path(context.run_config))
    run_dir = resolve_run_dir(context.run_config, population.config.output_dir)
    resume = bool(context.run_config.get("resume", False)) or os.environ.get("FEDREC_RESUME") == "1"
    deployment = bool(context.run_config.get("deployment", False))
    enrolled = str(context.run_config.get("enrolment", ""))
    enrolment = None
    if enrolled:
        enrolment = {node: d.client for node, d in load_enrolment(Path(enrolled)).items()}
    if deployment and population.config.federated.users_per_node > 1:
        raise ValueError(
            "federated.users_per_node > 1 simulates many users on one node; a deployed device "
            "is one user: set users_per_node: 1"
        )
    if deployment and not enrolled and not context.run_config.get("unauthenticated", False):
        raise ValueError(
            "a deployment takes each device's client from its enrolled key: set the run config "
            "`enrolment` (fedrec server run does), or `unauthenticated=true` for a test on "
            "loopback whose nodes may claim any client"
        )
    run_federation(
        population,
        run_dir,
        grid,
        resume=resume,
        write_stores=not deployment,
        enrolment=enrolment,
    )
