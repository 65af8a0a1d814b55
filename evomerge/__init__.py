"""evomerge: find model-merge recipes by evolutionary search, and materialize them."""

__version__ = "0.1.0"
