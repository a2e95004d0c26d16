"""The LLM recommender: PEFT adapters and soft prompts, DP-SGD against oracles, what crosses the
network, PEFT's own format, constrained decoding, and a federated run end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.config import parse_config
from fedrec.data import prepare_split
from fedrec.data.partition import partition_users
from fedrec.errors import FedrecConfigError
from fedrec.federated_models import build_federated_model
from fedrec.federation.model import PersonalFile
from fedrec.llm_rec.foundation import item_titles, load_foundation, run_foundation
from fedrec.llm_rec.model import LORA_PREFIX, PERSONAL_KEY, SCENARIO_PREFIX, example_losses
from fedrec.population import Population
from fedrec.privacy.dp_sgd import DPSGDConfig, dp_train

TINY = {
    "seed": 0,
    "data": {
        "source": "synthetic",
        "synthetic": {"num_users": 40, "num_items": 60, "mean_length": 20, "max_length": 40},
    },
    "evaluation": {"ks": [10, 20]},
    "audit": {"enabled": False},
    "semantic_id": {
        "content": {"dim": 16},
        "rqvae": {"levels": 2, "codebook_size": 8, "epochs": 30},
    },
    "llm": {
        "backbone": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "text_vocab": 200,
        },
        "foundation": {"epochs": 2, "consented_share": 0.2},
        "max_items": 5,
        "prompts": {"scenario_tokens": 3, "scenario_rule": "weekend", "personal_tokens": 2},
        "beam_width": 10,
    },
    "federated": {
        "num_rounds": 2,
        "clients_per_round": 4,
        "local_batch_size": 4,
        "record_window": 5,
    },
}


def tiny_config(**llm):
    data = copy.deepcopy(TINY)
    data["llm"].update(llm)
    return parse_config(data)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A foundation of the tiny config (catalogue + 20% consented sequences) and its data."""
    folder = tmp_path_factory.mktemp("foundation")
    config = tiny_config(foundation_dir=str(folder))
    dataset, split = prepare_split(config.data)
    meta = run_foundation(
        config.llm, config.semantic_id, config.seed, dataset, split, folder, progress=False
    )
    return config, dataset, split, folder, meta


def recommender(built, **llm):
    config, dataset, _, folder, _ = built
    config = tiny_config(foundation_dir=str(folder), **llm) if llm else config
    model = load_foundation(folder).recommender(config.llm, item_titles(dataset), config.seed)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at 0, which would leave A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def test_foundation_records_what_data_each_task_used(built):
    _config, dataset, split, folder, meta = built
    assert meta["records"]["catalogue"] == dataset.num_items
    assert meta["records"]["alignment"] == 2 * dataset.num_items
    assert len(meta["consented_users"]) == round(0.2 * split.num_users)
    assert meta["records"]["consented"] > 0
    assert meta["losses"][-1] < meta["losses"][0]
    foundation = load_foundation(folder)
    vocabulary, tokenizer = foundation.vocabulary, foundation.tokenizer
    first = tokenizer.convert_tokens_to_ids("<sid_0_0>")
    assert vocabulary.tokens.min() == first and vocabulary.tokens.max() < len(tokenizer)
    assert tokenizer.decode(vocabulary.tokens[3].tolist()).replace(" ", "").startswith("<sid_0_")


def _oracle_update(model, examples, clip):
    """-(1/B) Σ_i clip(∇ℓ_i) over the trainable parameters, one example at a time."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in range(len(examples)):
        model.zero_grad()
        model.per_example_loss(*examples.tensors)[row].backward()
        grads = {
            n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()
        }
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for name in total:
            total[name] += grads[name] * factor
    return {n: -v / len(examples) for n, v in total.items()}


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_dp_sgd_on_lora_and_prompts_equals_the_oracle(built, mode, clip):
    """Per-example clipping of LoRA + scenario prompts (mixed scenarios in one batch) +
    personal prompt: equal to one-example-at-a-time clipped gradients; with no clipping equal
    to the plain batch gradient. Guards PEFT's batch-expanded prompt (STACK-NOTES)."""
    _, _, split, _, _ = built
    model = recommender(built)
    examples = model.builder.records(split, np.arange(3), 5, period=30 * 86400)
    assert len(set(examples.tensors[3].tolist())) == 2  # both scenarios in the batch
    oracle = copy.deepcopy(model).train()
    expected = _oracle_update(oracle, examples, clip)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    config = DPSGDConfig(
        noise_multiplier=0.0, max_grad_norm=clip, batch_size=len(examples), grad_sample_mode=mode
    )
    dp_train(
        model,
        examples,
        config,
        1,
        1.0,
        poisson_sampling=False,
        optimizer=optimizer,
        loss_fn=example_losses,
    )
    after = dict(model.named_parameters())
    assert set(expected) == set(before) and len(expected) == 2 * 2 * 2 + 2 + 1
    for name, change in expected.items():
        assert change.abs().sum() > 0, name
        torch.testing.assert_close(after[name] - before[name], change, atol=1e-6, rtol=1e-4)
    if clip == 1e6:
        plain = copy.deepcopy(oracle)
        plain.zero_grad()
        plain.per_example_loss(*examples.tensors).mean().backward()
        for name, param in plain.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(
                    after[name] - before[name], -param.grad, atol=1e-6, rtol=1e-4
                )


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_take_a_noise_only_step(built, mode):
    _, _, split, _, _ = built
    model = recommender(built)
    examples = model.builder.records(split, np.arange(3), 5)  # 6 records, batch 1: q = 1/6
    before = {k: v.clone() for k, v in model.shared_state().items()}
    batches: list[int] = []

    def counting_loss(module, *batch):
        batches.append(len(batch[0]))
        return example_losses(module, *batch)

    config = DPSGDConfig(noise_multiplier=1.0, batch_size=1, grad_sample_mode=mode)
    torch.manual_seed(3)
    result = dp_train(model, examples, config, 8, 1e-2, loss_fn=counting_loss)
    assert result.steps == 8 * len(examples)
    assert 0 < len(batches) < result.steps  # some Poisson batches were empty, and stepped
    assert all(not torch.equal(before[k], v) for k, v in model.shared_state().items())


def test_only_adapters_cross_the_network(built):
    model = recommender(built)
    shared = model.shared_state()
    lora = [k for k in shared if k.startswith(LORA_PREFIX)]
    assert sorted(k for k in shared if not k.startswith(LORA_PREFIX)) == [
        f"{SCENARIO_PREFIX}0",
        f"{SCENARIO_PREFIX}1",
    ]
    assert len(lora) == 2 * 2 * 2 and all("lora_A" in k or "lora_B" in k for k in lora)
    assert PERSONAL_KEY not in shared
    trainable = sum(p.numel() for p in model.trainable_parameters())
    personal = model.personal_prompt.embedding.weight.numel()
    assert sum(v.numel() for v in shared.values()) == trainable - personal
    backbone = sum(p.numel() for p in model.peft.parameters() if not p.requires_grad)
    assert sum(v.numel() for v in shared.values()) < 0.2 * backbone
    other = recommender(built)
    other.load_shared_state(shared)
    assert all(torch.equal(other.shared_state()[k], v) for k, v in shared.items())
    with pytest.raises(ValueError, match="missing"):
        other.load_shared_state({k: v for k, v in shared.items() if k != f"{SCENARIO_PREFIX}1"})


def test_global_adapters_load_with_peft_model_from_pretrained(built, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, split, folder, _ = built
    model = recommender(built, prompts={"scenario_tokens": 3, "personal_tokens": 0})
    with torch.no_grad():
        for prompt in model.scenario_prompts:
            prompt.embedding.weight.normal_()
    model.save_global(tmp_path, str(folder / "backbone"))
    request = model.builder.requests(split, np.arange(1), "test")
    ids = request.tensors[0][:, request.tensors[1][0].bool()]  # one unpadded prompt
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder / "backbone"), tmp_path / "lora"
    )
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.peft(input_ids=ids).logits)
    merged = loaded.merge_and_unload()
    prompted = PeftModel.from_pretrained(merged, tmp_path / "scenario-0").eval()
    ours = model.eval().logits(ids, torch.ones_like(ids), torch.tensor([0]))
    theirs = prompted(input_ids=ids).logits[:, 3:]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_beam_search_returns_valid_items_and_greedy_matches_an_explicit_oracle(built):
    _, _, split, _, _ = built
    model = recommender(built).eval()
    ids, mask, _, scenario = model.builder.requests(split, np.arange(4), "test").tensors
    found = model.generate(ids, mask, scenario, beams=6)
    assert all(len(f) == 6 and len({i for i, _ in f}) == 6 for f in found)
    scores = [s for f in found for _, s in f]
    assert all(s <= 0 for s in scores)
    greedy = model.generate(ids, mask, scenario, beams=1)
    vocabulary = model.vocabulary
    for row in range(len(ids)):
        tokens, total = [], 0.0
        for _ in range(vocabulary.levels):
            step_ids = torch.cat([ids[row : row + 1], torch.tensor([tokens], dtype=torch.long)], 1)
            step_mask = torch.ones_like(step_ids)
            step_mask[:, : ids.shape[1]] = mask[row : row + 1]
            with torch.no_grad():
                logp = model.logits(step_ids, step_mask, scenario[row : row + 1])[0, -1]
            logp = logp.log_softmax(-1)
            allowed = vocabulary.allowed(tuple(tokens))
            best = max(allowed, key=lambda t: logp[t].item())
            tokens.append(best)
            total += logp[best].item()
        assert greedy[row][0][0] == vocabulary.item_of[tuple(tokens)]
        assert greedy[row][0][1] == pytest.approx(total, abs=1e-4)
        assert found[row][0][1] >= greedy[row][0][1] - 1e-5  # beam never worse than greedy


@pytest.mark.parametrize("beams", [1, 6])
def test_beam_search_reads_each_prompt_once_and_finds_what_plain_generate_finds(
    built, beams, monkeypatch
):
    """The prompt's cache is computed once and copied to the beams; transformers' own path
    (each beam reads the whole prompt) is the oracle."""
    from fedrec.semantic_id import retrieval

    _, _, split, _, _ = built
    model = recommender(built).eval()
    ids, mask, _, scenario = model.builder.requests(split, np.arange(5), "test").tensors
    found = model.generate(ids, mask, scenario, beams)
    monkeypatch.setattr(retrieval, "prompt_cache", lambda *_a, **_k: None)
    plain = model.generate(ids, mask, scenario, beams)
    for ours, theirs in zip(found, plain, strict=True):
        assert [i for i, _ in ours] == [i for i, _ in theirs]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-4)


def _population(config):
    dataset, split = prepare_split(config.data)
    fed = config.federated
    return Population(
        config, dataset, split, partition_users(dataset, fed.partitioning, fed.num_partitions, "")
    )


def test_local_training_lowers_the_loss_and_keeps_the_personal_prompt_on_device(built, tmp_path):
    config, _, _, _folder, _ = built
    population = _population(config)
    model = build_federated_model(config, population.publish(tmp_path), tmp_path)
    split = population.split.subset(population.partitions[0])
    examples = model.model.builder.records(split, np.arange(1), 5, period=None)  # no DP
    with torch.no_grad():
        start = model.model.per_example_loss(*examples.tensors).mean().item()
    personal = tmp_path / "device" / "personal.safetensors"
    fed = dataclasses.replace(config.federated, local_epochs=20, local_learning_rate=0.01)
    before = model.model.personal_state()[PERSONAL_KEY]
    result = model.train_local(split, fed, seed=0, personal=PersonalFile(personal))
    with torch.no_grad():
        end = model.model.per_example_loss(*examples.tensors).mean().item()
    assert end < start and result.num_examples == len(examples) and result.dp is None
    assert personal.stat().st_mode & 0o777 == 0o600  # the user's own: owner only
    from safetensors.torch import load_file

    kept = load_file(personal)[PERSONAL_KEY]
    assert not torch.equal(kept, before)
    assert PERSONAL_KEY not in model.shared_state()
    model.model.load_personal_state(None)  # a new user: back to the initial prompt
    assert torch.equal(model.model.personal_state()[PERSONAL_KEY], before)


def test_personal_steps_train_the_personal_prompt_alone(built, tmp_path):
    """``personal_steps`` leaves the shared update exactly as without them (they run after it
    and touch only the prompt) and fit the prompt to the client's records."""
    config, _, _, folder, _ = built
    population = _population(config)
    split = population.split.subset(population.partitions[0])
    examples = None
    results = {}
    for steps in (0, 5):
        cfg = tiny_config(
            foundation_dir=str(folder),
            prompts={
                **TINY["llm"]["prompts"],
                "personal_steps": steps,
                "personal_learning_rate": 0.05,
            },
        )
        model = build_federated_model(cfg, population.publish(tmp_path / str(steps)), tmp_path)
        examples = model.model.builder.records(split, np.arange(1), 5, period=None)
        fed = dataclasses.replace(cfg.federated, local_learning_rate=0.01)
        model.train_local(split, fed, seed=0, personal=PersonalFile(tmp_path / f"p{steps}"))
        with torch.no_grad():
            loss = model.model.per_example_loss(*examples.tensors).mean().item()
        results[steps] = (model.shared_state(), model.model.personal_state()[PERSONAL_KEY], loss)
    (shared0, prompt0, loss0), (shared5, prompt5, loss5) = results[0], results[5]
    assert shared0.keys() == shared5.keys()
    assert all(torch.equal(shared0[k], shared5[k]) for k in shared0)
    assert not torch.allclose(prompt0, prompt5) and loss5 < loss0


def test_history_init_is_the_mean_embedding_of_each_level(built):
    _, _, split, _, _ = built
    model = recommender(built, prompts={**TINY["llm"]["prompts"], "personal_tokens": 3})
    items = split.train_sequence(0)[0]
    rows = model.history_personal_state(items)[PERSONAL_KEY]
    words = model.peft.get_input_embeddings().weight
    codes = model.vocabulary.tokens
    for j in range(3):  # one item at a time, the level cycling through the code
        level = j % codes.shape[1]
        expected = torch.stack([words[int(codes[i, level])] for i in items.tolist()]).mean(0)
        torch.testing.assert_close(rows[j], expected)
    assert torch.equal(
        model.history_personal_state(items[:0])[PERSONAL_KEY], model.personal_state()[PERSONAL_KEY]
    )


@pytest.mark.parametrize("option", [{"personal_steps": 2}, {"personal_init": "history"}])
def test_data_fitted_personal_prompt_refused_under_record_dp(option):
    data = copy.deepcopy(TINY)
    data["llm"]["prompts"].update(option)
    data["federated"]["record_dp"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    with pytest.raises(FedrecConfigError, match="personal_steps: 0 and personal_init: shared"):
        parse_config(data)


def test_batched_fedsgd_shard_equals_each_client_on_its_own(built, tmp_path):
    """The oracle of the cohort path: one batched pass gives every client the adapters its own
    ``train_local`` (one SGD step on its one record) gives it."""
    from fedrec.federation.vectorised import batched_fedsgd_steps, why_not_vectorised

    _, _, _, folder, _ = built
    cfg = tiny_config(
        foundation_dir=str(folder),
        prompts={"scenario_tokens": 3, "scenario_rule": "weekend", "personal_tokens": 0},
    )
    fed = dataclasses.replace(
        cfg.federated,
        record_window=40,
        local_epochs=1,
        local_optimizer="sgd",
        local_learning_rate=0.5,
    )
    population = _population(cfg)
    model = build_federated_model(cfg, population.publish(tmp_path), tmp_path)
    with torch.no_grad():  # LoRA's B starts at 0: move it, so that A has a gradient too
        for name, param in model.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    assert why_not_vectorised(model, fed) is None
    splits = [population.split.subset(population.partitions[p]) for p in range(7)]
    start = model.shared_state()
    batched = batched_fedsgd_steps(model, splits, fed, list(range(7)))
    assert batched is not None and torch.equal(
        model.shared_state()["scenario.0"], start["scenario.0"]
    )
    for i, split in enumerate(splits):
        model.load_shared_state(start)
        alone = model.train_local(split, fed, seed=i, personal=None)
        state, result = batched[i]
        assert (result.num_examples, result.loss) == pytest.approx((alone.num_examples, alone.loss))
        for key, value in model.shared_state().items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5)
        assert any(not torch.equal(state[k], start[k]) for k in start)
    several = dataclasses.replace(fed, record_window=5)  # clients with several records
    assert batched_fedsgd_steps(model, splits, several, list(range(7))) is None
    personal = build_federated_model(
        tiny_config(foundation_dir=str(folder)), population.publish(tmp_path / "p"), tmp_path
    )
    assert "personal prompts" in str(why_not_vectorised(personal, fed))


def test_llm_cohort_nodes_equal_one_node_per_client_under_user_level_dp(
    built, tmp_path, monkeypatch, caplog
):
    """Through the federation: cohort nodes of 8 clients (one batched pass each, the node
    sending the sum of its clients' clipped updates) give the model one node per client gives;
    evaluation on a sample of users says how many."""
    from fedrec.llm_rec.federated import LLMFederatedModel
    from fedrec.population import population_of
    from simulations.inprocess import run_inprocess

    _, _, _, folder, _ = built
    batched: list[int] = []
    shard = LLMFederatedModel.fedsgd_shard

    def counted(self, splits, *args, **kwargs):
        result = shard(self, splits, *args, **kwargs)
        batched.append(len(splits) if result is not None else 0)
        return result

    monkeypatch.setattr(LLMFederatedModel, "fedsgd_shard", counted)
    caplog.set_level(logging.WARNING)
    models = {}
    for users_per_node in (1, 8):
        data = copy.deepcopy(TINY)
        data["llm"]["foundation_dir"] = str(folder)
        data["llm"]["prompts"]["personal_tokens"] = 0
        data["evaluation"]["sample_users"] = 15
        data["output_dir"] = str(tmp_path / str(users_per_node))
        data["federated"].update(
            users_per_node=users_per_node,
            record_window=40,  # every user one record: the batched path takes every client
            local_epochs=1,
            local_optimizer="sgd",
            local_learning_rate=1.0,
            strategy="fedadam",
            server_learning_rate=0.01,
            central_dp={"noise_multiplier": 0.5, "clipping_norm": 0.1},
            reproducible_noise=True,
        )
        run_dir = tmp_path / str(users_per_node)
        run_inprocess(population_of(parse_config(data)), run_dir, progress=False)
        models[users_per_node] = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["evaluated_users"] == 15 and lines[-1]["epsilon"]
    assert batched and 0 not in batched and max(batched) > 1  # every shard took the batch path
    # The clients whose updates are in their node's sum reply with metrics only: not "dropped".
    assert "dropped" not in caplog.text
    for key, tensor in models[1].items():
        torch.testing.assert_close(models[8][key], tensor, atol=1e-5, rtol=1e-4)


def test_inprocess_federation_and_recommend_command(built, tmp_path):
    from simulations.inprocess import run_inprocess

    config, dataset, _, _folder, _ = built
    population = _population(config)
    results = run_inprocess(population, tmp_path, eval_every=2, progress=False)
    assert results["rounds"] == 2 and "NDCG@10" in results["final"]["test"]
    for sub in ("lora", "scenario-0", "scenario-1"):
        assert (tmp_path / "global" / sub / "adapter_config.json").exists()
    trained = [p for p in (tmp_path / "client-state").iterdir() if "personal" in p.name]
    assert 4 <= len(trained) <= 8
    partition = int(trained[0].name.split("-")[1])
    user = str(dataset.raw_user_ids[population.partitions[partition][0]])
    out = CliRunner().invoke(app, ["recommend", "--run", str(tmp_path), "--user", user])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert str(trained[0]) in lines[0]
    ranked = [line for line in lines if line[:3].strip().rstrip(".").isdigit()]
    assert len(ranked) == 10
    bad = CliRunner().invoke(app, ["recommend", "--run", str(tmp_path), "--user", "nobody"])
    assert bad.exit_code == 2 and "not in" in bad.output
    assert json.loads((tmp_path / "results.json").read_text())["config"]["llm"]["max_items"] == 5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flower_simulation_trains_adapters_with_dp_and_keeps_prompts_on_devices(tmp_path):
    import yaml

    from .processes import flower_processes, python

    run_dir = tmp_path / "run"
    data = copy.deepcopy(TINY)
    data["output_dir"] = str(run_dir)
    data["federated"].update(
        num_rounds=3,
        eval_every=2,
        record_dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0, "batch_size": 2},
        record_epsilon_budget=50.0,
    )
    config = tmp_path / "llm.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    with flower_processes(tmp_path) as (_, start):
        proc = start([python(), "-m", "fedrec.cli", "simulate", "-c", str(config)], "log")
        assert proc.wait(timeout=500) == 0, (tmp_path / "log").read_text()[-4000:]
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert ["valid" in h for h in history] == [False, True, True]  # eval_every 2, and the last
    assert all(h["clients"] == 4 for h in history)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds"] == 3 and not results["failed"]
    assert (run_dir / "foundation" / "foundation.json").exists()  # built by the server first
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["model"].keys() == {
        k for k in state["model"] if k.startswith((LORA_PREFIX, SCENARIO_PREFIX))
    }
    clients = {e["party"] for e in state["ledger"]["events"] if e["mechanism"] == "dp-sgd"}
    personal = {
        f"client:{p.name.split('-')[1]}"
        for p in (run_dir / "client-state").iterdir()
        if p.name.endswith("personal.safetensors")
    }
    assert personal == clients and 4 <= len(clients) <= 12
    for sub in ("lora", "scenario-0", "scenario-1"):
        assert (run_dir / "global" / sub / "adapter_model.safetensors").exists()


def test_a_foundation_built_for_another_backbone_is_refused(built, tmp_path):
    from fedrec.llm_rec.federated import ensure_foundation

    _, _, _, folder, _ = built
    other = tiny_config(
        foundation_dir=str(folder),
        backbone={**TINY["llm"]["backbone"], "hidden_size": 64},
    )
    with pytest.raises(ValueError, match=r"llm\.foundation_dir"):
        _population(other).publish(tmp_path)
    same = tiny_config(foundation_dir=str(folder))
    population = _population(same)
    assert (
        ensure_foundation(
            same.llm, same.semantic_id, same.seed, population.dataset, population.split, tmp_path
        )
        == folder
    )


def _plain_causal_lm(dataset, folder):
    """A saved model + tokenizer that knows nothing of codes, as a hub model would be."""
    from fedrec.llm_rec.backbone import tiny_llama, train_tokenizer
    from fedrec.llm_rec.config import BackboneConfig
    from fedrec.semantic_id.content import item_texts

    tokenizer = train_tokenizer(item_texts(dataset), 150)
    model = tiny_llama(BackboneConfig(16, 1, 2, 32, 64, 150), len(tokenizer), tokenizer, 0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_any_causal_lm_by_path_gets_the_code_tokens_and_resized_embeddings(built, tmp_path):
    """``llm.base_model``: a local folder of a model + tokenizer (what a hub id downloads to)."""
    from transformers import AutoModelForCausalLM

    _, dataset, split, _, _ = built
    _, tokenizer = _plain_causal_lm(dataset, tmp_path / "plain")
    config = tiny_config(base_model=str(tmp_path / "plain"), foundation={"epochs": 1})
    meta = run_foundation(
        config.llm,
        config.semantic_id,
        config.seed,
        dataset,
        split,
        tmp_path / "foundation",
        progress=False,
    )
    codes = load_foundation(tmp_path / "foundation").vocabulary
    assert meta["vocab_size"] == len(tokenizer) + (codes.size - codes.offsets[0])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "foundation" / "backbone")
    assert loaded.get_input_embeddings().num_embeddings == meta["vocab_size"]
    assert loaded.config.hidden_size == 16


def test_code_tokens_of_a_pretrained_model_start_at_their_items_titles(built, tmp_path):
    """``llm.code_init: titles``, against a recomputation one code token at a time: the mean
    over the items whose code holds the token of their title's mean input (and, untied,
    output) embedding, from the base model's own tables."""
    from transformers import AutoModelForCausalLM

    _, dataset, split, _, _ = built
    base, tokenizer = _plain_causal_lm(dataset, tmp_path / "plain")
    config = tiny_config(
        base_model=str(tmp_path / "plain"), code_init="titles", foundation={"epochs": 0}
    )
    run_foundation(
        config.llm, config.semantic_id, config.seed, dataset, split, tmp_path / "f", False
    )
    vocabulary = load_foundation(tmp_path / "f").vocabulary
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "f" / "backbone")
    titles = item_titles(dataset, config.llm.title_style)
    for name, table in (("input", "get_input_embeddings"), ("output", "get_output_embeddings")):
        before = getattr(base, table)().weight
        after = getattr(loaded, table)().weight
        for token in np.unique(vocabulary.tokens)[::7].tolist():
            items = np.flatnonzero((vocabulary.tokens == token).any(axis=1))
            means = []
            for item in items.tolist():
                ids = tokenizer(titles[item], add_special_tokens=False)["input_ids"][:16]
                means.append(sum(before[i] for i in ids) / len(ids))
            expected = sum(means) / len(means)
            torch.testing.assert_close(after[token], expected, msg=f"{name} row {token}")
        torch.testing.assert_close(after[: len(tokenizer)], before)  # text rows untouched
    with pytest.raises(ValueError, match="base_model"):
        tiny_config(code_init="titles")


def test_prompts_with_titles_read_titles_but_predict_only_codes(built):
    _, dataset, split, folder, _ = built
    config = tiny_config(foundation_dir=str(folder), with_titles=True, title_tokens=3)
    builder = load_foundation(folder).builder(config.llm, item_titles(dataset))
    tokens, labels = builder.item_tokens(0)
    levels = builder.vocabulary.levels
    assert tokens[:levels] == builder.vocabulary.tokens[0].tolist() == labels[:levels]
    assert 1 <= len(tokens) - levels <= 3 and set(labels[levels:]) == {-100}
    _, mask, record_labels, _ = builder.records(split, np.arange(2), 5).tensors
    assert ((record_labels != -100).sum(dim=1) % levels == 0).all()
    assert ((record_labels != -100) <= mask.bool()).all()


def test_readable_titles_are_what_a_pretrained_model_has_read():
    from fedrec.data.catalogue import ItemCatalogue
    from fedrec.llm_rec.foundation import catalogue_titles

    catalogue = ItemCatalogue(
        ("1", "2"), {"title": ("Ice Storm, The", "Heat"), "year": ("1997", "")}
    )
    assert catalogue_titles(catalogue) == ["Ice Storm, The", "Heat"]
    assert catalogue_titles(catalogue, "readable") == ["The Ice Storm (1997)", "Heat"]
    with pytest.raises(FedrecConfigError, match="title_style"):
        tiny_config(title_style="pretty")


def test_a_foundation_aligned_with_other_titles_is_refused(built, tmp_path):
    _, dataset, _, folder, meta = built
    assert meta["title_style"] == "catalogue"
    config = tiny_config(foundation_dir=str(folder), with_titles=True, title_style="readable")
    with pytest.raises(ValueError, match=r"llm\.title_style: catalogue"):
        load_foundation(folder).builder(config.llm, item_titles(dataset, "readable"))
    with pytest.raises(ValueError, match=r"llm\.title_style: catalogue"):
        _population(config).publish(tmp_path)  # the server refuses before any round
    codes_only = tiny_config(foundation_dir=str(folder), title_style="readable")
    load_foundation(folder).builder(codes_only.llm, item_titles(dataset, "readable"))
