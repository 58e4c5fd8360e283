"""mlx_gemma4: Gemma 4 (E2B, E4B, 26B-A4B, 31B) on MLX."""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, Gemma4Error
from .generate import generate_tokens
from .load import load, load_model
from .model import Model

# The subpackage `mlx_gemma4.convert` ships from convert/; its function is the public name.
from .convert import convert  # noqa: E402  (after the imports above: load.py imports it lazily)

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
