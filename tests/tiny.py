"""Config sections of the smallest models the tests build (seconds on 2 cores)."""

TINY_LLM = {
    "audit": {"enabled": False},
    "semantic_id": {"content": {"dim": 8}, "rqvae": {"levels": 2, "codebook_size": 4}},
    "llm": {
        "backbone": {
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 32,
            "text_vocab": 120,
        },
        "foundation": {"epochs": 1},
        "max_items": 4,
        "prompts": {"scenario_tokens": 2, "personal_tokens": 2},
        "beam_width": 10,
    },
}

# A tiny HSTU federation of 4 clients over 30 synthetic users (one round of it: about a second).
TINY_HSTU_FEDERATION = {
    "seed": 1,
    "data": {
        "source": "synthetic",
        "synthetic": {"num_users": 30, "num_items": 50, "mean_length": 15, "seed": 0},
    },
    "model": {"name": "hstu", "max_len": 16, "embedding_dim": 16, "num_blocks": 1},
    "evaluation": {"ks": [10]},
    "audit": {"enabled": False},
    "federated": {
        "partitioning": "hash",
        "num_partitions": 4,
        "num_rounds": 3,
        "clients_per_round": 4,
        "local_learning_rate": 0.01,
    },
}
