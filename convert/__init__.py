"""Hugging Face -> mlx_gemma4 checkpoint conversion (ships as `mlx_gemma4.convert`)."""

from .write import convert, convert_tensors, quantization_config

__all__ = ["convert", "convert_tensors", "quantization_config"]

from mlx_gemma4._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "convert")
