#!/usr/bin/env bash
# A PostgreSQL server for the tests, from Debian's packages (tools/bootstrap.sh installs them): starts the
# newest cluster (creating one if there is none), creates the role and database sotto_test, and prints
# the URL that tools/test.sh exports as SOTTO_TEST_POSTGRES_URL. Idempotent; needs root.
#   export SOTTO_TEST_POSTGRES_URL="$(bash tools/postgres.sh)"
set -euo pipefail
NAME=sotto_test
# Only the URL goes to stdout: everything the PostgreSQL tools print (such as pg_ctlcluster's
# "Removed stale pid file.") goes to stderr, so that "$(bash tools/postgres.sh)" is always a clean URL.
exec 3>&1 1>&2

if [ "$(id -u)" != 0 ] || ! command -v pg_lsclusters >/dev/null 2>&1; then
  echo "tools/postgres.sh needs root and Debian's postgresql package (apt-get install postgresql);" \
    "or set SOTTO_TEST_POSTGRES_URL to a server of your own" >&2
  exit 1
fi
cd /  # psql runs as the postgres user, who may not be allowed into the current folder

# The newest cluster, leaving out the two that tools/plproxy.sh creates for the sharded store.
cluster() { pg_lsclusters --no-header | awk '$2 !~ /^data_shard_/' | sort -V | tail -n 1; }
if [ -z "$(cluster)" ]; then
  version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
  pg_createcluster "$version" main 3>&-
fi
read -r version name port status _ <<<"$(cluster)"
if [[ "$status" != online* ]]; then
  pg_ctlcluster "$version" "$name" start 3>&-  # the server must not hold our stdout open
fi

sql() { runuser -u postgres -- psql --port "$port" -v ON_ERROR_STOP=1 -qtAc "$1"; }
for _ in $(seq 50); do sql "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
if [ -z "$(sql "SELECT 1 FROM pg_roles WHERE rolname = '$NAME'")" ]; then
  sql "CREATE ROLE $NAME LOGIN PASSWORD '$NAME'" >/dev/null
fi
if [ -z "$(sql "SELECT 1 FROM pg_database WHERE datname = '$NAME'")" ]; then
  sql "CREATE DATABASE $NAME OWNER $NAME" >/dev/null
fi
echo "postgresql://$NAME:$NAME@127.0.0.1:$port/$NAME" >&3
