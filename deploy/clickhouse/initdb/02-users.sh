#!/bin/bash
# gpu-pipeline: the two least-privilege ClickHouse users of the compose stack.
#
# Run by the clickhouse-server image's entrypoint (executed, or sourced when it is not
# executable) after 01-schema.sql, as the admin user CLICKHOUSE_USER, which needs
# CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT=1.  Idempotent: with
# CLICKHOUSE_ALWAYS_RUN_INITDB_SCRIPTS=1 it runs at every start, so a changed password or
# grant takes effect on the next restart.
#
#   writer  the pipeline: creates the schema if missing (CREATE DATABASE/TABLE IF NOT
#           EXISTS, CREATE OR REPLACE VIEW), inserts with deduplication tokens, reads its
#           job record and row counts back.  Nothing outside `clickstream`.
#   reader  dashboards and notebooks: SELECT on `clickstream` only, readonly = 1;
#           max_execution_time stays changeable, which Grafana's ClickHouse data source
#           sets on every query.
#
# Passwords come from the environment and reach the server only as SHA-256 hashes: no
# plaintext password in the SQL, and no quoting problem whatever characters it holds.

chpw_hash() {
    printf '%s' "$1" | sha256sum | cut -d ' ' -f 1
}

: "${CLICKHOUSE_WRITER_PASSWORD:?must be set for the pipeline user writer}"
: "${CLICKHOUSE_READER_PASSWORD:?must be set for the read-only user reader}"
WRITER_HASH="$(chpw_hash "$CLICKHOUSE_WRITER_PASSWORD")"
READER_HASH="$(chpw_hash "$CLICKHOUSE_READER_PASSWORD")"

clickhouse client --host 127.0.0.1 --user "${CLICKHOUSE_USER:-default}" \
    --password "${CLICKHOUSE_PASSWORD:-}" --multiquery <<SQL
CREATE SETTINGS PROFILE IF NOT EXISTS gpu_readonly;
ALTER SETTINGS PROFILE gpu_readonly SETTINGS readonly = 1, max_execution_time = 300 CHANGEABLE_IN_READONLY;

CREATE USER IF NOT EXISTS writer IDENTIFIED WITH sha256_hash BY '${WRITER_HASH}';
ALTER USER writer IDENTIFIED WITH sha256_hash BY '${WRITER_HASH}' DEFAULT DATABASE clickstream;
REVOKE ALL ON *.* FROM writer;
GRANT SELECT, INSERT, CREATE DATABASE, CREATE TABLE, CREATE VIEW, DROP VIEW ON clickstream.* TO writer;

CREATE USER IF NOT EXISTS reader IDENTIFIED WITH sha256_hash BY '${READER_HASH}';
ALTER USER reader IDENTIFIED WITH sha256_hash BY '${READER_HASH}' DEFAULT DATABASE clickstream SETTINGS PROFILE 'gpu_readonly';
REVOKE ALL ON *.* FROM reader;
GRANT SELECT ON clickstream.* TO reader;
SQL
