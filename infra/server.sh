#!/usr/bin/env bash
# Start a local Prefect API server + UI backed by SQLite (~/.prefect/prefect.db).
# Then, in another terminal: export PREFECT_API_URL=http://127.0.0.1:4200/api; muse serve
set -euo pipefail
HOST=${PREFECT_SERVER_API_HOST:-127.0.0.1}
PORT=${PREFECT_SERVER_API_PORT:-4200}
echo "Prefect UI: http://$HOST:$PORT  (clients: export PREFECT_API_URL=http://$HOST:$PORT/api)"
exec prefect server start --host "$HOST" --port "$PORT"
