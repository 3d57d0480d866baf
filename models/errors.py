"""The one error type model loading raises: its message tells the user what to do."""


class ModelLoadError(Exception):
    """A model could not be found, fetched or understood."""
