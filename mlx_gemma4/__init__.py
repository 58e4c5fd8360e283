"""mlx_gemma4: Gemma 4 (E2B, E4B, 26B-A4B, 31B) on MLX.

`convert` and `load` are modules that are called like the functions they hold:
`mlx_gemma4.convert(hf_path, mlx_path)`, `model, tokenizer = mlx_gemma4.load(path)`.
"""

from . import convert, load
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, Gemma4Error
from .generate import generate_tokens
from .load import load_model
from .model import Model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Gemma4Error",
    "Model",
    "ModelConfig",
    "convert",
    "generate_tokens",
    "load",
    "load_model",
]
__version__ = "0.1.0"
