"""The project's error type: every refusal the user should read is one of these."""


class SliceGPTError(Exception):
    """A problem with the user's input or environment, reported as one line and a non-zero exit."""
