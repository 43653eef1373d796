"""Components by name (routers, dispatchers): each registered once, looked up with an error naming the valid ones."""
from __future__ import annotations

from megavq.errors import ConfigError


class Registry:
    def __init__(self, kind: str, key: str):
        """kind: what is registered ("router"); key: how users name one, for errors ("moe.backend")."""
        self.kind, self.key, self.classes = kind, key, {}

    def register(self, name: str):
        """Class decorator: registers the class under `name` (and sets its `name`)."""
        def wrap(cls):
            if name in self.classes:
                raise ConfigError(f"{self.kind} '{name}' is registered twice")
            cls.name = name
            self.classes[name] = cls
            return cls
        return wrap

    def names(self) -> list[str]:
        return sorted(self.classes)

    def get(self, name: str):
        if name not in self.classes:
            raise ConfigError(f"unknown {self.key} '{name}' (valid: {self.names()})")
        return self.classes[name]

    def where(self, declared) -> list[str]:
        """The names whose class satisfies `declared(cls)`, in registration order."""
        return [name for name, cls in self.classes.items() if declared(cls)]
