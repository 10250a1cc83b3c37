#!/usr/bin/env bash
# PostgreSQL servers for the sharded-store tests, from Debian's packages: installs postgresql-15-plproxy,
# creates (once) and starts two more clusters with pg_createcluster, data_shard_a and data_shard_b on
# ports 5433 and 5434 (names that sort before "main", so that a script taking the last cluster of
# pg_lsclusters, as tools/postgres.sh once did, still finds the main one), each with a role and
# database sotto_shard for the partitions (the role may create databases: the sharded benchmark's
# scratch shards), and on the cluster tools/postgres.sh runs a database sotto_proxy with the plproxy
# extension, owned by a role sotto_proxy.
# That role is a superuser: PL/Proxy is an untrusted language, so only a superuser may create the proxy
# functions (`sotto-server` creates them on start); the proxy database holds no profile data.
# Prints the environment that tools/test.sh exports, one `NAME=VALUE` a line:
#   SOTTO_TEST_PLPROXY_URL   the proxy database (postgresql:// URL)
#   SOTTO_TEST_SHARD_URLS    the two shard databases, space-separated
#   SOTTO_TEST_SHARD_CLUSTERS  their clusters as VERSION/NAME, space-separated (the fault test stops one)
# Idempotent; needs root.
#   eval "$(bash tools/plproxy.sh | sed 's/^/export /')"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec 3>&1 1>&2  # only the NAME=VALUE lines go to stdout

if [ "$(id -u)" != 0 ] || ! command -v pg_lsclusters >/dev/null 2>&1; then
  echo "tools/plproxy.sh needs root and Debian's postgresql package (apt-get install postgresql)" >&2
  exit 1
fi
MAIN_URL="$(bash "$ROOT/tools/postgres.sh")"  # the main cluster, for the proxy database
cd /  # psql runs as the postgres user, who may not be allowed into the current folder
version="$(pg_lsclusters --no-header | sort -V | tail -n 1 | awk '{print $1}')"
main_port="$(echo "$MAIN_URL" | sed -E 's#.*:([0-9]+)/[^/]*$#\1#')"
if [ ! -f "/usr/share/postgresql/$version/extension/plproxy.control" ]; then
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-$version-plproxy" >/dev/null; then
    apt-get update -qq >/dev/null  # a clean machine may have no package lists yet
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-$version-plproxy" >/dev/null
  fi
fi

sql() {  # PORT DATABASE STATEMENT
  runuser -u postgres -- psql --port "$1" --dbname "$2" -v ON_ERROR_STOP=1 -qtAc "$3"
}
ensure_role_and_db() {  # PORT ROLE DATABASE ROLE_OPTIONS
  if [ -z "$(sql "$1" postgres "SELECT 1 FROM pg_roles WHERE rolname = '$2'")" ]; then
    sql "$1" postgres "CREATE ROLE $2 LOGIN PASSWORD '$2' $4" >/dev/null
  fi
  if [ -z "$(sql "$1" postgres "SELECT 1 FROM pg_database WHERE datname = '$3'")" ]; then
    sql "$1" postgres "CREATE DATABASE $3 OWNER $2" >/dev/null
  fi
}

shard_urls=()
shard_clusters=()
for spec in data_shard_a:5433 data_shard_b:5434; do
  name="${spec%%:*}"
  port="${spec##*:}"
  if ! pg_lsclusters --no-header | awk '{print $1 "/" $2}' | grep -qx "$version/$name"; then
    # Each test opens a pool of proxy connections, and each of those one connection per partition.
    pg_createcluster "$version" "$name" --port "$port" -o max_connections=300 3>&-
  fi
  status="$(pg_lsclusters --no-header | awk -v v="$version" -v n="$name" '$1 == v && $2 == n {print $4}')"
  if [[ "$status" != online* ]]; then
    pg_ctlcluster "$version" "$name" start 3>&-  # the server must not hold our stdout open
  fi
  for _ in $(seq 50); do sql "$port" postgres "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
  ensure_role_and_db "$port" sotto_shard sotto_shard ""
  # `python -m tools.bench scale --store sharded` puts each shard of its clusters in a scratch database.
  sql "$port" postgres "ALTER ROLE sotto_shard CREATEDB" >/dev/null
  shard_urls+=("postgresql://sotto_shard:sotto_shard@127.0.0.1:$port/sotto_shard")
  shard_clusters+=("$version/$name")
done

ensure_role_and_db "$main_port" sotto_proxy sotto_proxy SUPERUSER
sql "$main_port" sotto_proxy "CREATE EXTENSION IF NOT EXISTS plproxy" >/dev/null

echo "SOTTO_TEST_PLPROXY_URL=postgresql://sotto_proxy:sotto_proxy@127.0.0.1:$main_port/sotto_proxy" >&3
echo "SOTTO_TEST_SHARD_URLS='${shard_urls[*]}'" >&3
echo "SOTTO_TEST_SHARD_CLUSTERS='${shard_clusters[*]}'" >&3
