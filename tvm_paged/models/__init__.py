"""Real models: reading GGUF files (config, weights, tokenizer) for the serving runtime."""

from .gguf_file import GGUFFile, ModelSpec, default_model_path, open_gguf
from .tokenizer import Tokenizer

__all__ = ["GGUFFile", "ModelSpec", "Tokenizer", "default_model_path", "open_gguf"]
