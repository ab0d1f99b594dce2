"""attar: turn big models and big data into small, strong ones."""

__version__ = "0.1.0"
