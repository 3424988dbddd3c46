"""Prefect flows: the `muse` DAG flow and its deployments. Flows only wire stages."""

import os

# Stage code logs with the standard `logging` module under "muse"; let Prefect ship those logs to the UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "muse")
