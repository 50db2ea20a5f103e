"""In-tree distillation methods. Each registers through the ``mmdd.methods`` entry-point group in
``pyproject.toml`` (the same path as an external package); importing this package registers nothing."""
