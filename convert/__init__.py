"""Hugging Face -> mlx_gemma4 checkpoint conversion (ships as `mlx_gemma4.convert`)."""

from .write import convert

__all__ = ["convert"]

from mlx_gemma4._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "convert")
