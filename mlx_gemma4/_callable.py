"""Modules that are also the function they are named after.

The public API names `mlx_gemma4.convert(...)`, `mlx_gemma4.load(...)` and
`mlx_gemma4.generate(...)` are functions, while those names are also modules; a plain function would shadow the
module and break `import mlx_gemma4.convert.mapping as m`. Calling the module calls the function.
"""

from __future__ import annotations

import sys
import types


def make_module_callable(module_name: str, function_name: str) -> None:
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    module.__class__ = CallableModule
