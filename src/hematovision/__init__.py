"""HematoVision: white-blood-cell analysis in stained blood-smear images."""

__version__ = "0.1.0"
