"""Native MiniCPM-V models: `load_model` reads a hub-format directory, `build_model` a config alone."""

from .config import MiniCPMVConfig, detect_family
from .loading import build_model, load_model
from .tokenizer import load_tokenizer, special_token_ids

__all__ = ["MiniCPMVConfig", "build_model", "detect_family", "load_model", "load_tokenizer", "special_token_ids"]
