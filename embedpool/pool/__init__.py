"""The adaptive worker pool: supervisor, workers, wire protocol, resource readings and scaling policy."""
