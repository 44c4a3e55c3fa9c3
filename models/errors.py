"""The exception a model constructor raises for an argument it cannot work with."""

from __future__ import annotations


class ModelConfigError(ValueError):
    """A constructor argument out of range: `ModelConfigError("regress_range", "got [8, 4]; expected ...")`.

    `str(err)` is one line, `"<argument>: <problem>"`, naming the argument as the constructor spells it, so
    whoever built the model from a config can name the config key instead (stages: `model.detector.<argument>`).
    """

    def __init__(self, argument: str, problem: str) -> None:
        super().__init__(argument, problem)
        self.argument = argument
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.argument}: {self.problem}"
