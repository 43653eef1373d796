"""User extensions without editing megavq: Python files or modules that register routers
(`@megavq.moe.routers.register("name")`) or dispatchers (`@megavq.moe.dispatch.register_dispatcher("name")`).

Scripts take `--plugin PATH_OR_MODULE` (repeatable) and read `MEGAVQ_PLUGINS` (paths or modules separated by
the OS path separator), and import them before the configuration is read, on every rank.
In Python, import the file yourself before `megavq.load_model` or `load_config`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from megavq.errors import ConfigError

ENV = "MEGAVQ_PLUGINS"
_loaded: dict[str, object] = {}


def load_plugins(names: list[str] = ()) -> list[str]:
    """Import each plugin (a .py file or a module name) once, those of MEGAVQ_PLUGINS first; returns their names."""
    from_env = [n for n in os.environ.get(ENV, "").split(os.pathsep) if n]
    for name in [*from_env, *names]:
        if name not in _loaded:
            _loaded[name] = _import(name)
    return list(_loaded)


def _import(name: str):
    path = Path(name)
    if path.suffix != ".py":
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plugin {name!r} is not a .py file nor an importable module: {e}") from None
    if not path.is_file():
        raise ConfigError(f"plugin file {name} does not exist")
    module_name = f"megavq_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
