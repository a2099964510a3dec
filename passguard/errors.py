"""Error types that cross module boundaries.

Every error a user can cause carries a message that names the problem (and,
where there is one, the key path or field), so the CLI and the HTTP layer can
show it as it is instead of a traceback.
"""


class PassguardError(Exception):
    """Base class: a problem passguard can explain to a person."""


class InputError(PassguardError):
    """A request body or document passguard cannot use (answered with 400)."""


class ConfigError(PassguardError):
    """An invalid configuration file; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


class ScrapeError(PassguardError):
    """A target could not be scraped or did not answer like Envoy.

    The message says what failed (a status, a size, a parse error) and never
    quotes the answer: it is shown by the API, the status page and the gate's
    reasons. ``answer`` keeps the start of the answer for the log only
    (``passguard.envoy.excerpt.for_log``)."""

    def __init__(self, message: str, answer: str | bytes | None = None) -> None:
        super().__init__(message)
        self.answer = answer
