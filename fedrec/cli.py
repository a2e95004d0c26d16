"""The ``fedrec`` command."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from fedrec.errors import FedrecConfigError, FedrecDataError

app = typer.Typer(
    help="fedrec: privacy-preserving federated recommendation (HSTU, SASRec, DP, Flower).",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment YAML (see configs/).")
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Folder with the data files; overrides data.path of the config."
    ),
]


def _load(config: Path, data_dir: Path | None):  # type: ignore[no-untyped-def]
    from fedrec.config import load_config

    experiment = load_config(config)
    if data_dir is not None:
        experiment.data.path = str(data_dir)
    return experiment


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _configure_logging() -> None:
    # force: Opacus calls logging.basicConfig at import (no level, its own format), which
    # would otherwise win and hide our INFO lines.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )


@app.command()
def train(
    config: ConfigOption,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Run folder; default: output_dir of the config.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the config's seed.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda; overrides train.device.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a sequential recommender centrally with early stopping on validation NDCG@10.

    Writes config.yaml, best.pt (best validated weights) and results.json (test metrics next to
    the popularity baseline, seed, versions and wall time) into the run folder.
    """
    from fedrec.experiment import run_centralized

    _configure_logging()
    try:
        experiment = _load(config, data_dir)
        if seed is not None:
            experiment.seed = seed
        overrides = {
            key: value
            for key, value in (("epochs", epochs), ("device", device))
            if value is not None
        }
        experiment.train = dataclasses.replace(experiment.train, progress=progress, **overrides)
        run_dir = output_dir or Path(experiment.output_dir)
        results = run_centralized(experiment, run_dir)
    except (FedrecConfigError, FedrecDataError, ValueError) as err:
        _fail(err)
        return
    typer.echo(f"\nresults in {run_dir / 'results.json'}")
    typer.echo(f"{'metric':<14}{results['model']:>10}{'popularity':>12}")
    for name, value in results["test"].items():
        typer.echo(
            f"{name:<14}{value:>10.4f}{results['baselines']['popularity']['test'][name]:>12.4f}"
        )


@app.command()
def simulate(
    config: ConfigOption,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Run folder; default: output_dir of the config.")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Override federated.num_rounds.")] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue from the run folder's checkpoint (model and privacy ledger)."),
    ] = False,
) -> None:
    """Run a federated simulation on Flower (one virtual client per partition, Ray backend).

    Every round the server appends to metrics.jsonl and checkpoints the model and the privacy
    ledger; every federated.eval_every rounds (and after the last) it evaluates the global model
    (full ranking) and audits bias and fairness into audit.jsonl. At the end it writes
    results.json, privacy.json/privacy.html and audit.html. `federated:` in the config sets
    partitioning, sampling, local training, the strategy and DP (record-level DP-SGD and/or
    user-level DP-FedAvg); `audit:` sets the audit (server-side or federated from client sums,
    thresholds, re-ranking). With an `llm:` section the clients train only the LLM
    recommender's adapters (the server first runs the foundation stage if its folder is
    missing), keep their personal prompts, and the result is saved under RUN/global in PEFT
    format.
    """
    import os

    import yaml

    from fedrec.federation.layout import CONFIG_ENV, RUN_DIR_ENV
    from fedrec.population import load_population

    _configure_logging()
    try:
        experiment = _load(config, data_dir)
        if rounds is not None:
            experiment.federated = dataclasses.replace(experiment.federated, num_rounds=rounds)
        run_dir = output_dir or Path(experiment.output_dir)
        if resume and not (run_dir / "checkpoint.pt").exists():
            raise FedrecDataError(
                "--resume needs the checkpoint of an earlier run here (starting again would "
                "reset the federation's ledger): drop --resume, or pass that run's --output-dir",
                run_dir / "checkpoint.pt",
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = run_dir / "config.yaml"
        resolved.write_text(yaml.safe_dump(experiment.to_dict(), sort_keys=False), encoding="utf-8")
        population = load_population(str(resolved))
    except (FedrecConfigError, FedrecDataError, ValueError) as err:
        _fail(err)
        return
    # The apps read these: run_simulation hands them an empty run config.
    os.environ[CONFIG_ENV] = str(resolved.resolve())
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    os.environ["FEDREC_RESUME"] = "1" if resume else "0"
    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1")):
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedrec.federation.cohort import node_count
    from server.app import app as server_app

    results = run_dir / "results.json"
    results.unlink(missing_ok=True)  # a stale one from an earlier run must not pass as this one's
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=node_count(
            len(population.partitions), population.config.federated.users_per_node
        ),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    if not results.exists():
        _fail(RuntimeError(f"the simulation ended without {results}; see the log above"))
    outcome = json.loads(results.read_text(encoding="utf-8"))
    if outcome["stopped_early"]:
        typer.echo(f"stopped early: {outcome['stopped_early']}", err=True)
    typer.echo(_summary(outcome, population.config.train.monitor))
    typer.echo(f"metrics: {run_dir / 'metrics.jsonl'}")
    typer.echo(f"results: {results}")
    if (run_dir / "audit.html").exists():
        typer.echo(f"audit report: {run_dir / 'audit.html'}")
    typer.echo(f"privacy report: {run_dir / 'privacy.html'}")
    if outcome["failed"]:
        raise typer.Exit(1)


def _summary(outcome: dict[str, Any], monitor: str) -> str:
    """One line: the best-validated round's test metric against popularity, and ε so far."""
    best, final = outcome["best_valid"], outcome["final"]
    if best is None or final is None:
        return "no round was evaluated"
    popularity = outcome["baselines"]["popularity"]["test"][monitor]
    from fedrec.federation.privacy import epsilon_text

    spent = final.get("epsilon") or {}
    return (
        f"test {monitor} {best['test'][monitor]:.4f} (round {best['round']}, best valid) vs "
        f"popularity {popularity:.4f}; {epsilon_text(spent).strip() if spent else 'no DP'}"
    )


@app.command("privacy-report")
def privacy_report(
    run_dir: Annotated[Path, typer.Argument(help="A federated run folder (holds checkpoint.pt).")],
) -> None:
    """Write privacy.json and privacy.html for a run from the ledger in its checkpoint."""
    from fedrec.config import parse_config
    from fedrec.federation import privacy_disclosures
    from fedrec.federation.layout import DEVICE_DIR
    from fedrec.files import load_checkpoint
    from fedrec.privacy import PrivacyLedger
    from fedrec.privacy.report import write_privacy_report

    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.exists():
        _fail(FedrecDataError("no checkpoint.pt: run `fedrec simulate` first", run_dir))
        return
    try:
        state = load_checkpoint(checkpoint)
    except FedrecDataError as err:
        _fail(err)
        return
    ledger = PrivacyLedger()
    ledger.load_state_dict(state["ledger"])
    metrics = run_dir / "metrics.jsonl"
    history = (
        [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
        if metrics.exists()
        else []
    )
    config = parse_config(state["config"], str(checkpoint))
    disclosures = privacy_disclosures(config.federated, config.audit, history, run_dir / DEVICE_DIR)
    json_path, html_path = write_privacy_report(ledger, run_dir, disclosures)
    typer.echo(f"{json_path}\n{html_path}")


@app.command("privacy-audit")
def privacy_audit(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A central (fedrec train) or federated run whose config set "
            "privacy_audit.holdout_fraction > 0 (and optionally privacy_audit.canaries)."
        ),
    ],
    max_users: Annotated[
        int, typer.Option(help="At most this many members and as many non-members are scored.")
    ] = 1000,
    references: Annotated[
        int, typer.Option(help="Random sequences each canary is ranked against.")
    ] = 1000,
    seed: Annotated[
        int, typer.Option(help="Seed of the user draw, bootstrap and permutations.")
    ] = 0,
) -> None:
    """Try to break the run's privacy: a user-level membership-inference attack (members vs
    held-out users: AUC with a bootstrap interval and permutation p-value, checked against the
    claimed ε, δ through TPR ≤ e^ε·FPR + δ) and the exposure of planted canaries. Writes
    privacy_audit.json and adds a section to privacy.html."""
    from fedrec.privacy_audit import run_privacy_audit

    try:
        report = run_privacy_audit(run_dir, max_users, references, seed)
    except FedrecDataError as err:
        _fail(err)
        return
    membership = report["membership"]
    lo, hi = membership["auc_interval"]
    typer.echo(
        f"membership inference: AUC {membership['auc']:.3f} (95% CI {lo:.3f}–{hi:.3f}), "
        f"p = {membership['p_value']:.3g}, {membership['members']} members vs "
        f"{membership['nonmembers']} non-members"
    )
    typer.echo(membership["bound"]["verdict"])
    typer.echo(
        f"(with these users even a perfect attack certifies at most ε ≈ "
        f"{report['largest_certifiable_epsilon']:.2f}: a larger claim cannot be contradicted here)"
    )
    if "canaries" in report:
        typer.echo(
            f"canary exposure: median {report['canaries']['exposure_median']:.2f} bits of "
            f"{report['canaries']['max_possible_exposure']:.2f} possible"
        )
    if (run_dir / "privacy.json").exists():
        from fedrec.privacy.report import rewrite_privacy_report

        page = rewrite_privacy_report(run_dir)
        typer.echo(str(page) if page else "privacy.json predates this report: run privacy-report")
    typer.echo(str(run_dir / "privacy_audit.json"))


@app.command("audit-report")
def audit_report(
    run_dir: Annotated[Path, typer.Argument(help="A federated run folder (holds audit.jsonl).")],
) -> None:
    """Write audit.html (group gaps with confidence bands, exposure, calibration over rounds,
    threshold breaches) from the run's audit.jsonl."""
    from fedrec.audits.report import write_audit_report

    try:
        typer.echo(str(write_audit_report(run_dir)))
    except FileNotFoundError as err:
        _fail(err)


@app.command("semantic-ids")
def semantic_ids(
    config: ConfigOption,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Run folder; default: output_dir of the config.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Build semantic IDs and measure generative retrieval (`semantic_id:` in the config).

    Embeds every item's content (tfidf, hf, collab or hybrid encoder), trains an RQ-VAE on the
    catalogue only, gives every item a unique code (extra level on collisions) and saves the
    artefact to RUN/semantic_ids/. Then trains a small GPT-2 over code tokens on the users'
    training histories and reports HR@10 / NDCG@10 of constrained beam search (full-ranking
    conventions, history excluded), its throughput, and cold-start HR@10 on held-out items.
    """
    from fedrec.data import prepare_split
    from fedrec.experiment import write_json_atomic
    from fedrec.semantic_id.pipeline import run_semantic_ids

    _configure_logging()
    try:
        experiment = _load(config, data_dir)
        run_dir = output_dir or Path(experiment.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dataset, split = prepare_split(experiment.data)
        results = run_semantic_ids(experiment.semantic_id, dataset, split, run_dir, progress)
    except (FedrecConfigError, FedrecDataError, ValueError, FileNotFoundError) as err:
        _fail(err)
        return
    results["config"] = experiment.to_dict()
    write_json_atomic(results, run_dir / "results.json")
    codes = results["codes"]
    typer.echo(f"codes: {run_dir / 'semantic_ids'}")
    typer.echo(
        f"level usage {[round(level['usage'], 3) for level in codes['levels']]}, collision "
        f"rate {codes['collision_rate']:.3f}, reconstruction MSE {codes['reconstruction_mse']:.3f}"
    )
    test = results["retrieval"]["test"]
    typer.echo(f"retrieval (test): {test['metrics']}, {test['users_per_second']:.1f} users/s")
    if "cold_start" in results:
        cold = results["cold_start"]
        typer.echo(
            f"cold start ({cold['users']} users): {cold['retrieval']} vs popularity {cold['popularity']}"
        )
    typer.echo(f"results: {run_dir / 'results.json'}")


@app.command()
def foundation(
    config: ConfigOption,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(help="Foundation folder; default: llm.foundation_dir, else RUN/foundation."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Pretrain the LLM recommender's backbone on public data (`llm:` in the config).

    The server's foundation stage, run on its own: builds (or loads) the semantic IDs, trains a
    BPE tokenizer on the catalogue and a small Llama (or loads llm.base_model), adds the code
    tokens and trains the whole backbone on catalogue text, code/title alignment and the
    training sequences of llm.foundation.consented_share of the users. `fedrec simulate` runs
    this stage itself when the folder is missing.
    """
    from fedrec.data import prepare_split
    from fedrec.llm_rec.foundation import run_foundation

    _configure_logging()
    try:
        experiment = _load(config, data_dir)
        if experiment.llm is None:
            raise ValueError(f"{config}: no llm section; see configs/llm-synthetic.yaml")
        folder = output_dir or Path(
            experiment.llm.foundation_dir or Path(experiment.output_dir) / "foundation"
        )
        dataset, split = prepare_split(experiment.data)
        meta = run_foundation(
            experiment.llm,
            experiment.semantic_id,
            experiment.seed,
            dataset,
            split,
            folder,
            progress,
        )
    except (FedrecConfigError, FedrecDataError, ValueError, FileNotFoundError) as err:
        _fail(err)
        return
    losses = meta["losses"]
    trained = f"final loss {losses[-1]:.3f}" if losses else "not trained (foundation.epochs: 0)"
    typer.echo(
        f"foundation: {folder} ({meta['parameters']:,} parameters, records {meta['records']}, "
        f"{trained}, {meta['seconds']:.0f} s)"
    )


@app.command("zero-shot")
def zero_shot(
    config: ConfigOption,
    data_dir: DataDirOption = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Run folder; default: output_dir of the config.")
    ] = None,
    users: Annotated[
        int,
        typer.Option(
            help="Users drawn (with the config's seed) for the full and few-shot settings; 0: "
            "all. A pretrained model reads ~250 tokens per user: seconds each on a CPU."
        ),
    ] = 200,
    few_shot: Annotated[
        int, typer.Option(help="Events the few-shot prompt keeps (each history's last N).")
    ] = 5,
    stage: Annotated[
        str, typer.Option(help="test, or valid to choose settings (no cold start there).")
    ] = "test",
    length_penalty: Annotated[
        float,
        typer.Option(help="Beam score log p(line) / tokens^this: 0 whole line, 1 per token."),
    ] = 0.0,
    baseline: Annotated[
        list[Path] | None,
        typer.Option(
            help="A finished HSTU/SASRec run folder (repeatable) measured on the same users "
            "with the same few-shot cut."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Measure the pretrained llm.base_model recommending from titles alone, before any training.

    The prompt lists the user's last llm.max_items titles, one per line; beam search
    (llm.beam_width beams) writes the next line under a trie of the catalogue's titles that
    leaves out what the user has seen. Full-ranking metrics on the test stage next to
    popularity on the same users, for the full history, the last --few-shot events, and the
    users whose test item is a cold-start item of the semantic_id section. Writes
    RUN/zero_shot.json (zero_shot_valid.json with --stage valid).
    """
    import functools

    import torch

    from fedrec.data import prepare_split
    from fedrec.experiment import write_json_atomic
    from fedrec.llm_rec.zero_shot import run_zero_shot
    from fedrec.privacy_audit import load_model, run_config
    from fedrec.training import model_scorer

    _configure_logging()
    try:
        experiment = _load(config, data_dir)
        if experiment.llm is None:
            raise ValueError(f"{config}: no llm section; see configs/ml-100k-llm-zero-shot.yaml")
        if stage not in ("valid", "test"):
            raise ValueError(f"--stage must be valid or test, not {stage!r}")
        run_dir = output_dir or Path(experiment.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dataset, split = prepare_split(experiment.data)
        baselines = {}
        for run in baseline or []:
            trained_with = run_config(run)
            trained = load_model(run, trained_with, split.num_items)
            baselines[f"{trained_with.model_name} ({run})"] = functools.partial(
                model_scorer, trained, device=torch.device("cpu")
            )
        results = run_zero_shot(
            experiment.llm,
            experiment.semantic_id,
            dataset,
            split,
            experiment.evaluation,
            users,
            few_shot,
            experiment.seed,
            "valid" if stage == "valid" else "test",
            length_penalty,
            baselines,
            progress,
        )
    except (FedrecConfigError, FedrecDataError, ValueError, FileNotFoundError) as err:
        _fail(err)
        return
    results["config"] = experiment.to_dict()
    written = run_dir / ("zero_shot.json" if stage == "test" else "zero_shot_valid.json")
    write_json_atomic(results, written)
    for name in ("full", "few_shot", "cold_start"):
        if name not in results:
            continue  # cold start: test stage only, with semantic_id.cold_start_share > 0
        row = results[name]
        typer.echo(
            f"{name} ({row['users']} users, {row['seconds_per_user']:.1f} s/user): model "
            f"{_rounded(row['model'])} vs popularity {_rounded(row['popularity'])}"
        )
        for who, metrics in row.get("baselines", {}).items():
            typer.echo(f"    {who}: {_rounded(metrics)}")
    typer.echo(f"results: {written}")


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items() if k.startswith(("HR", "NDCG"))}


@app.command()
def recommend(
    run: Annotated[Path, typer.Option("--run", help="Folder of a finished LLM federated run.")],
    user: Annotated[str, typer.Option("--user", help="User id as in the data files.")],
    k: Annotated[int, typer.Option(help="How many items.")] = 10,
) -> None:
    """Print a user's top-K titles from the run's global adapters (RUN/global, PEFT format)
    and, when the run folder holds one, that user's personal prompt."""
    from fedrec.recommend import recommend as top_k

    try:
        out = top_k(run, user, k)
    except (FedrecConfigError, FedrecDataError, ValueError, FileNotFoundError) as err:
        _fail(err)
        return
    typer.echo(
        f"user {out['user']}, scenario {out['scenario']}, personal prompt: "
        f"{out['personal_prompt'] or 'none (the initial prompt)'}"
    )
    typer.echo("recent: " + " | ".join(out["history"]))
    for rank, row in enumerate(out["top"], 1):
        typer.echo(f"{rank:2d}. {row['title']}  (item {row['item']}, log p {row['log_prob']:.2f})")


@app.command("data-summary")
def data_summary(config: ConfigOption, data_dir: DataDirOption = None) -> None:
    """Load, preprocess and split the data of a config; print its statistics as JSON."""
    from fedrec.data import load_dataset, prepare_split

    try:
        experiment = _load(config, data_dir)
        raw = load_dataset(experiment.data)
        processed, _ = prepare_split(experiment.data)
    except (FedrecConfigError, FedrecDataError, ValueError) as err:
        _fail(err)
        return
    summary = {
        "raw": raw.summary(),
        "preprocessed": processed.summary(),
        "item_features": sorted(processed.item_features),
        "user_features": sorted(processed.user_features),
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="ml-100k or ml-1m")],
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where to keep archives (default ~/.cache/fedrec).")
    ] = None,
) -> None:
    """Download a MovieLens archive from GroupLens, verify its SHA-256 and unpack it."""
    from fedrec.data.download import DEFAULT_CACHE, download_movielens

    try:
        folder = download_movielens(name, cache_dir or DEFAULT_CACHE)
    except FedrecDataError as err:
        _fail(err)
        return
    typer.echo(str(folder))


@app.command()
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for the keys and certificates.")],
    host: Annotated[
        list[str],
        typer.Option(
            "--host",
            help="A DNS name or IP address the SuperLink is reached by (repeat for each).",
        ),
    ],
    device: Annotated[
        list[str] | None,
        typer.Option("--device", help="A device to make a key pair for (repeat for each)."),
    ] = None,
    devices: Annotated[int, typer.Option(help="Also make key pairs device-0 .. device-(N-1).")] = 0,
    days: Annotated[int, typer.Option(help="Validity of new certificates, in days.")] = 365,
    renew_server: Annotated[
        bool, typer.Option(help="Make a new server certificate (and key) from the same CA.")
    ] = False,
) -> None:
    """Make the deployment's CA, the SuperLink's TLS certificate (valid for every --host) and
    one EC key pair per device for Flower's SuperNode authentication. Private keys are written
    0600. Nothing is overwritten: run it again to add devices.

    Then: flower-superlink --ssl-ca-certfile OUT/ca.pem --ssl-certfile OUT/server.pem
    --ssl-keyfile OUT/server.key --enable-supernode-auth; flwr supernode register
    OUT/devices/NAME.pub; flower-supernode --root-certificates OUT/ca.pem
    --auth-supernode-private-key OUT/devices/NAME."""
    from server.certs import make_credentials

    names = [*(device or []), *(f"device-{i}" for i in range(devices))]
    try:
        made = make_credentials(out, host, names, days, renew_server)
    except (ValueError, OSError) as err:
        _fail(err)
        return
    for path in made.created:
        typer.echo(f"wrote {path}")
    kept = {made.ca_cert, made.server_cert, made.server_key, *made.device_keys.values()}
    for path in sorted(kept - set(made.created)):
        typer.echo(f"kept  {path}")


@app.command()
def serve(
    bundle: Annotated[
        Path,
        typer.Option(
            "--bundle",
            help="A serving bundle (a folder with serving.json), or a folder of them: the "
            "newest is served and newer ones are swapped in as they appear.",
        ),
    ],
    certs: Annotated[
        Path | None,
        typer.Option(
            "--certs", help="The folder `fedrec certs` wrote (server.pem, server.key): TLS."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 50061,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    poll_seconds: Annotated[
        float, typer.Option(help="How often to look for a newer bundle.")
    ] = 10.0,
    workers: Annotated[int, typer.Option(help="Requests served at once.")] = 8,
    max_batch: Annotated[
        int,
        typer.Option(
            help="Requests that arrive while the funnel runs form its next batch, up to this "
            "many (1: each request alone). One thread runs the models."
        ),
    ] = 64,
    threads: Annotated[
        int, typer.Option(help="CPU threads of the model thread (torch intra-op).")
    ] = 1,
    insecure: Annotated[
        bool, typer.Option(help="Serve without TLS (local experiments only).")
    ] = False,
    foundation: Annotated[
        Path | None,
        typer.Option(
            help="An LLM federation's foundation folder (a copy of the server's): needed when "
            "the bundles' funnel has the llm source (checked against the digest they name)."
        ),
    ] = None,
) -> None:
    """Serve RecommendService (fedrec/serving/proto/recommend.proto) over gRPC with TLS:
    Recommend(history, context, k), RecommendMany (up to 1,024 users a call), Health and
    ModelInfo (bundle version, ε so far). Requests are validated (bad ones get
    INVALID_ARGUMENT) and nothing from them is stored or logged."""
    from fedrec.recommend import foundation_llm_source
    from fedrec.serving.service import (
        Batcher,
        BundleWatcher,
        Recommender,
        RecommendServicer,
        device_for,
        epsilon_text,
        newest_bundle,
    )
    from fedrec.serving.service import serve as start
    from fedrec.serving.store import load_serving_bundle
    from server.deploy import Credentials

    _configure_logging()
    if certs is None and not insecure:
        _fail(ValueError("--certs DIR is required (make it with `fedrec certs`), or --insecure"))
    try:
        if max_batch < 1 or threads < 1:
            raise ValueError("--max-batch and --threads must be >= 1")
        chosen = device_for(device)
        path = newest_bundle(bundle)
        llm_builder = None if foundation is None else foundation_llm_source(foundation)
        servicer = RecommendServicer(
            Recommender(load_serving_bundle(path), chosen, llm_builder),
            Batcher(max_batch, threads),
        )
        key_pair = None
        if certs is not None:
            credentials = Credentials(certs)
            credentials.check()
            key_pair = (credentials.server_cert.read_bytes(), credentials.server_key.read_bytes())
        certificate, key = key_pair or (None, None)
        server, bound = start(servicer, f"{host}:{port}", certificate, key, workers)
    except (FedrecDataError, ValueError, OSError) as err:
        _fail(err)
        return
    current = servicer.current.bundle
    typer.echo(
        f"serving bundle version {current.version} ({path}) on {host}:{bound} "
        f"({'TLS' if key_pair else 'no TLS'}, {chosen}); ε so far: "
        f"{epsilon_text(current)}"
    )
    watcher = BundleWatcher(bundle, servicer, chosen, poll_seconds, llm_builder)
    watcher.thread.start()
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        watcher.stop.set()
        server.stop(grace=5).wait()


@app.command()
def models() -> None:
    """List the registered models and their default options."""
    from fedrec.models import model_config, model_names

    for name in model_names():
        typer.echo(f"{name}: {dataclasses.asdict(model_config(name))}")


def _subcommands() -> None:
    """``fedrec device ...`` and ``fedrec server ...`` live beside the apps they run."""
    from clients.cli import app as device_app
    from server.cli import app as server_app

    app.add_typer(device_app, name="device")
    app.add_typer(server_app, name="server")


_subcommands()

if __name__ == "__main__":
    app()
