"""Operating streamrecall: the CLI, `up` and its supervisor, status, produce and query."""
