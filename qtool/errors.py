"""User-facing errors. The CLI turns a ``QtoolError`` into one line on stderr and exit code 2."""


class QtoolError(Exception):
    """Bad input from the user (recipe, model, data file). The message names the field or file and the fix."""


class ArtifactError(QtoolError):
    """A run-directory artifact is missing, truncated or was edited after it was written."""
