"""mlx_gemma4: Gemma 4 (E2B, E4B, 26B-A4B, 31B) on MLX.

`convert`, `load` and `generate` are modules that are called like the functions they hold:
`mlx_gemma4.convert(hf_path, mlx_path)`, `model, tokenizer = mlx_gemma4.load(path)`,
`reply = mlx_gemma4.generate(model, tokenizer, "Hi")`.
"""

from . import convert, generate, load
from .cache import PromptCache
from .channels import ChannelParser, Event
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, Gemma4Error
from .generate import Reply, Stats, generate_tokens, stream_generate
from .load import load_model
from .model import Model
from .sampling import SamplingOptions
from .tokenizer import Tokenizer

__all__ = [
    "ChannelParser",
    "CheckpointError",
    "ConfigError",
    "Event",
    "Gemma4Error",
    "Model",
    "ModelConfig",
    "PromptCache",
    "Reply",
    "SamplingOptions",
    "Stats",
    "Tokenizer",
    "convert",
    "generate",
    "generate_tokens",
    "load",
    "load_model",
    "stream_generate",
]
__version__ = "0.1.0"
