"""Examples: the course example and the Wikipedia demo (``examples/wiki``)."""
