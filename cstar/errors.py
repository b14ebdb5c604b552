"""User-facing errors: what went wrong and how to fix it, never a deep traceback."""

from __future__ import annotations


class CstarError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it.

    The CLI prints `error: <message>` and `  fix: <hint>` and exits with status 2.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (fix: {self.hint})"


class MissingDependencyError(CstarError):
    """An optional package is not installed."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = "") -> None:
        what = f" for {purpose}" if purpose else ""
        hint = f"pip install 'cstar[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"the Python package '{package}' is required{what} but is not installed", hint)
        self.package = package
        self.extra = extra


class UnreachableBudget(CstarError):
    """A compression ratio the method cannot reach on this model; `best_ratio` is the best it reaches
    (a field, so callers such as the benchmarks never parse it back out of the message)."""

    def __init__(self, message: str, hint: str | None, best_ratio: float) -> None:
        super().__init__(message, hint)
        self.best_ratio = best_ratio


class GateFailure(CstarError):
    """A verification gate failed (exit status 1, not 2: the input was fine, the artifact is not)."""
