"""The LLM recommender: a causal LM over semantic-ID tokens with PEFT LoRA and soft prompts,
its server-side foundation stage, and its place in the federation (only adapters travel)."""
