"""MLflow tracking: a record of results, never an input of them.

No stage imports this package (an import-linter contract): the CLI records what a stage did, around the stage call
(:mod:`benchmark.tracking.recorder`), so changing how runs are recorded never makes a cached result stale.
"""

from benchmark.tracking.store import Tracker, ensure_store, project_root, serve_ui, sqlite_path, tracking_uri

__all__ = ["Tracker", "ensure_store", "project_root", "serve_ui", "sqlite_path", "tracking_uri"]
