#!/usr/bin/env bash
# Runs the integration tests that cover ingest, release, consumers, crashes,
# security and failover against each server that scripts/build-servers.sh
# builds from the vendor directory (Redis 7.2.6, Valkey 8.0.1), through the
# harness variable TIDEMARK_TEST_REDIS_SERVER. Without a vendor directory
# (a fresh clone) it says so and exits 0: the suite already ran against the
# system's redis-server.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO=${CARGO:-cargo}
# The named subset: ingest and release (seed, model, order, fast_paths,
# malformed, hostile), consumers (consume, redelivery), crash, security,
# failover (Sentinel, behind an endpoint), silent connections, memory and
# dedup; and TLS on a cluster.
SUBSET=(seed:: model:: order:: fast_paths:: malformed:: hostile:: consume:: redelivery:: crash:: security::
  failover:: silence:: memory:: dedup:: cluster::tls_works_on_a_cluster)

servers=$(scripts/build-servers.sh)
if [[ -z $servers ]]; then
  echo "test-servers: no vendored servers (../shared/vendor): tested against the system redis-server only"
  exit 0
fi
while read -r name binary; do
  echo "=== integration subset against $name ($binary)"
  TIDEMARK_TEST_REDIS_SERVER=$binary "$CARGO" test --test it -- "${SUBSET[@]}"
done <<<"$servers"
