"""The training worker: a separate process that turns pending forget requests into artifacts."""
