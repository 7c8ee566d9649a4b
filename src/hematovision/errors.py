"""Errors caused by input or environment; the CLI shows them as one clear line, the API as a 4xx."""


class HematoVisionError(Exception):
    """Base class for errors a user can act on (bad input, missing weights, wrong layout)."""


class DatasetError(HematoVisionError, ValueError):
    """A dataset folder or file has the wrong layout or content."""
