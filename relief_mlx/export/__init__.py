"""Take an adapter anywhere: fused into an MLX model, or exported to Hugging Face, PEFT or GGUF."""
