"""Config sections of the smallest LLM recommender the tests build (seconds on 2 cores)."""

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
