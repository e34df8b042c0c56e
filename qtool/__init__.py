"""qtool: compress large language models with YAML recipes run through a resumable pipeline."""

__version__ = "0.1.0"
