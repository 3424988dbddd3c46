"""Prefect flows: the `muse` DAG flow and its deployments. Flows only wire stages."""

import logging
import os

# Stage code logs with the standard `logging` module under "muse"; let Prefect ship those logs to the UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "muse")
# The embedded (ephemeral) API of a first run takes ~20 s to start on a loaded host, Prefect's own limit.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# The embedded server's telemetry logs an ERROR every few minutes on an offline machine; set it to true to send it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A stage run outside a flow run (from Python, in a Ray worker) logs to the console only, without a warning per line.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Prefect attaches its handlers to extra loggers but leaves their level to the root's WARNING, which would drop
# the stages' INFO lines (training loss, samples/s and ETA; each stage's figures) from the UI and the console.
if logging.getLogger("muse").level == logging.NOTSET:
    logging.getLogger("muse").setLevel(logging.INFO)
