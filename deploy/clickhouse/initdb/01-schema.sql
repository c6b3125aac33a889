-- gpu-pipeline: database `clickstream`, its tables and its dashboard views.
-- Generated from gpu_pipeline.sinks.ddl.schema_statements: do not edit by hand.
-- Regenerate with: .venv/bin/python deploy/clickhouse/render_schema.py
-- Every statement is idempotent (IF NOT EXISTS, CREATE OR REPLACE VIEW): the server's
-- entrypoint may run this file at every start, and the pipeline runs the same statements.

CREATE DATABASE IF NOT EXISTS clickstream COMMENT 'gpu-pipeline clickstream output (SPEC §3)';

CREATE TABLE IF NOT EXISTS clickstream.events
(
    `event_id` String COMMENT 'Producer event id; unique per logical event, repeated by producer retries',
    `user_id` Int64 COMMENT 'User id (0 <= x < 2^63)',
    `ts` DateTime64(3, 'UTC') COMMENT 'Event time (UTC, millisecond precision)',
    `event_type` LowCardinality(String) COMMENT 'page_view, product_view, search, add_to_cart, remove_from_cart, checkout or purchase',
    `page` Nullable(String) COMMENT 'URL path of the page, if given',
    `product_id` Nullable(Int64) COMMENT 'Product id; present for product_view, add_to_cart, remove_from_cart, purchase',
    `category` LowCardinality(Nullable(String)) COMMENT 'Product category, if given',
    `price` Nullable(Float64) COMMENT 'Unit price; present for add_to_cart and purchase',
    `quantity` Int32 COMMENT 'Number of units (default 1)',
    `country` LowCardinality(Nullable(String)) COMMENT 'Two-letter country code, if given',
    `device` LowCardinality(Nullable(String)) COMMENT 'desktop, mobile or tablet, if given',
    `referrer` Nullable(String) COMMENT 'Referrer, if given',
    `session_id` UInt64 COMMENT 'Deterministic id of the session this event belongs to',
    `partition` Int32 COMMENT 'Source partition (Kafka partition; 0 for a file)',
    `offset` Int64 COMMENT 'Source position: Kafka offset, or 0-based line number of a file',
    `seq` Int32 COMMENT 'Index of the event inside its source record (several NDJSON events per message)'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (event_type, ts, user_id)
SETTINGS non_replicated_deduplication_window = 10000
COMMENT 'One row per on-time accepted event (SPEC §3)';

CREATE TABLE IF NOT EXISTS clickstream.sessions
(
    `user_id` Int64 COMMENT 'User id',
    `session_id` UInt64 COMMENT 'Deterministic id from (user_id, first ts, first event_id)',
    `session_start` DateTime64(3, 'UTC') COMMENT 'Minimum ts of the session\'s events',
    `session_end` DateTime64(3, 'UTC') COMMENT 'Maximum ts of the session\'s events',
    `events` Int64 COMMENT 'Number of on-time events in the session',
    `page_views` Int64 COMMENT 'Number of page_view events',
    `product_views` Int64 COMMENT 'Number of product_view events',
    `add_to_carts` Int64 COMMENT 'Number of add_to_cart events',
    `purchases` Int64 COMMENT 'Number of purchase events',
    `revenue` Float64 COMMENT 'Sum of price * quantity over the purchase events',
    `landing_page` Nullable(String) COMMENT 'page of the event with the minimum ts (ties: earlier arrival)',
    `exit_page` Nullable(String) COMMENT 'page of the event with the maximum ts (ties: later arrival)',
    `partition` Int32 COMMENT 'Source partition'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(session_start)
ORDER BY (session_start, user_id)
SETTINGS non_replicated_deduplication_window = 10000
COMMENT 'One row per closed session, written once when it closes';

CREATE TABLE IF NOT EXISTS clickstream.traffic_1m
(
    `window_start` DateTime64(3, 'UTC') COMMENT 'Window start (inclusive, UTC, aligned to the Unix epoch)',
    `window_end` DateTime64(3, 'UTC') COMMENT 'Window end (exclusive, UTC)',
    `event_type` LowCardinality(String) COMMENT 'Event type (the window key)',
    `events` Int64 COMMENT 'Number of on-time events of this type in the window',
    `users` Int64 COMMENT 'Exact number of distinct user_id among the counted events of this partition',
    `revenue` Float64 COMMENT 'Sum of price * quantity over the purchase events of this row',
    `partition` Int32 COMMENT 'Source partition; rows are partial per partition and add up across them',
    `version` UInt64 COMMENT 'Write number of this window: 1 on the first write, +1 per later on-time event'
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (window_start, window_end, event_type, `partition`)
SETTINGS non_replicated_deduplication_window = 10000
COMMENT '1-minute tumbling windows per event_type and partition; read with FINAL (or traffic_1m_total)';

CREATE TABLE IF NOT EXISTS clickstream.product_5m
(
    `window_start` DateTime64(3, 'UTC') COMMENT 'Window start (inclusive, UTC, aligned to the Unix epoch)',
    `window_end` DateTime64(3, 'UTC') COMMENT 'Window end (exclusive, UTC)',
    `product_id` Int64 COMMENT 'Product id (the window key)',
    `views` Int64 COMMENT 'Number of product_view events',
    `add_to_carts` Int64 COMMENT 'Number of add_to_cart events',
    `purchases` Int64 COMMENT 'Number of purchase events',
    `revenue` Float64 COMMENT 'Sum of price * quantity over the purchase events of this row',
    `users` Int64 COMMENT 'Exact number of distinct user_id among the counted events of this partition',
    `partition` Int32 COMMENT 'Source partition; rows are partial per partition and add up across them',
    `version` UInt64 COMMENT 'Write number of this window: 1 on the first write, +1 per later on-time event'
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (window_start, window_end, product_id, `partition`)
SETTINGS non_replicated_deduplication_window = 10000
COMMENT '5-minute windows sliding by 1 minute per product_id and partition; read with FINAL (or product_5m_total)';

CREATE TABLE IF NOT EXISTS clickstream.late_events
(
    `event_id` String COMMENT 'Producer event id; unique per logical event, repeated by producer retries',
    `user_id` Int64 COMMENT 'User id (0 <= x < 2^63)',
    `ts` DateTime64(3, 'UTC') COMMENT 'Event time (UTC, millisecond precision)',
    `event_type` LowCardinality(String) COMMENT 'page_view, product_view, search, add_to_cart, remove_from_cart, checkout or purchase',
    `page` Nullable(String) COMMENT 'URL path of the page, if given',
    `product_id` Nullable(Int64) COMMENT 'Product id; present for product_view, add_to_cart, remove_from_cart, purchase',
    `category` LowCardinality(Nullable(String)) COMMENT 'Product category, if given',
    `price` Nullable(Float64) COMMENT 'Unit price; present for add_to_cart and purchase',
    `quantity` Int32 COMMENT 'Number of units (default 1)',
    `country` LowCardinality(Nullable(String)) COMMENT 'Two-letter country code, if given',
    `device` LowCardinality(Nullable(String)) COMMENT 'desktop, mobile or tablet, if given',
    `referrer` Nullable(String) COMMENT 'Referrer, if given',
    `watermark` DateTime64(3, 'UTC') COMMENT 'Watermark of the partition when the event arrived',
    `reason` LowCardinality(String) COMMENT 'Why the event is too late',
    `partition` Int32 COMMENT 'Source partition (Kafka partition; 0 for a file)',
    `offset` Int64 COMMENT 'Source position: Kafka offset, or 0-based line number of a file',
    `seq` Int32 COMMENT 'Index of the event inside its source record (several NDJSON events per message)'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, `partition`, `offset`, seq)
SETTINGS non_replicated_deduplication_window = 10000
COMMENT 'Events that arrived later than the allowed lateness behind the watermark';

CREATE TABLE IF NOT EXISTS clickstream.dead_letters
(
    `raw` String COMMENT 'The record exactly as received (bytes, not necessarily valid UTF-8)',
    `error` String COMMENT 'Why the record is invalid, naming the field',
    `source` LowCardinality(String) COMMENT 'Source the record came from',
    `partition` Int32 COMMENT 'Source partition (Kafka partition; 0 for a file)',
    `offset` Int64 COMMENT 'Source position: Kafka offset, or 0-based line number of a file',
    `seq` Int32 COMMENT 'Index of the event inside its source record (several NDJSON events per message)'
)
ENGINE = MergeTree
ORDER BY (source, `partition`, `offset`, seq)
SETTINGS non_replicated_deduplication_window = 10000
COMMENT 'Invalid records with their raw bytes and the reason';

CREATE TABLE IF NOT EXISTS clickstream.quality_1m
(
    `minute` DateTime64(3, 'UTC') COMMENT 'Minute (UTC): an event\'s own ts; a dead letter\'s partition clock where it arrived (1970-01-01 before the partition has one)',
    `records` Int64 COMMENT 'Records of this minute: events + dead_letters',
    `dead_letters` Int64 COMMENT 'Invalid records (decoder and event-time guard)',
    `events` Int64 COMMENT 'Valid events the event-time guard let through: duplicates + late + on_time',
    `duplicates` Int64 COMMENT 'Events dropped as duplicates',
    `late` Int64 COMMENT 'Events written to late_events',
    `on_time` Int64 COMMENT 'Events written to events',
    `with_page` Int64 COMMENT 'On-time events that carry page',
    `with_category` Int64 COMMENT 'On-time events that carry category',
    `with_country` Int64 COMMENT 'On-time events that carry country',
    `with_device` Int64 COMMENT 'On-time events that carry device',
    `with_referrer` Int64 COMMENT 'On-time events that carry referrer',
    `lag_events` Int64 COMMENT 'On-time events whose record has a source timestamp (Kafka)',
    `lag_ms_sum` Int64 COMMENT 'Sum over those events of source timestamp - ts (ingest lag, ms)',
    `lag_ms_max` Int64 COMMENT 'Largest ingest lag among those events (0 when lag_events = 0)',
    `partition` Int32 COMMENT 'Source partition; rows are partial sums that add up (quality_1m_total)'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, `partition`)
SETTINGS non_replicated_deduplication_window = 10000
COMMENT 'Data-quality counts per minute, as partial sums per partition; read quality_1m_total';

CREATE TABLE IF NOT EXISTS clickstream.pipeline_jobs
(
    `job_id` String COMMENT 'Job id: hash of source, sink, database and semantics',
    `identity` String COMMENT 'The job identity as JSON (no secrets)',
    `cuts` String COMMENT 'How its first run cut batches and checkpoints',
    `recorded_at` DateTime64(3, 'UTC') COMMENT 'When the job first wrote here'
)
ENGINE = ReplacingMergeTree
ORDER BY job_id
COMMENT 'The gpu-pipeline job whose output this database holds';

CREATE OR REPLACE VIEW clickstream.traffic_1m_total AS SELECT window_start, window_end, event_type, sum(events) AS events, sum(users) AS users, sum(revenue) AS revenue, count() AS partitions FROM clickstream.traffic_1m FINAL GROUP BY window_start, window_end, event_type COMMENT 'traffic_1m summed over partitions (latest version of every row)';

CREATE OR REPLACE VIEW clickstream.product_5m_total AS SELECT window_start, window_end, product_id, sum(views) AS views, sum(add_to_carts) AS add_to_carts, sum(purchases) AS purchases, sum(revenue) AS revenue, sum(users) AS users, count() AS partitions FROM clickstream.product_5m FINAL GROUP BY window_start, window_end, product_id COMMENT 'product_5m summed over partitions (latest version of every row)';

CREATE OR REPLACE VIEW clickstream.quality_1m_total AS SELECT minute, n_records AS records, n_dead_letters AS dead_letters, n_events AS events, n_duplicates AS duplicates, n_late AS late, n_on_time AS on_time, if(n_records = 0, NULL, n_dead_letters / n_records) AS dead_letter_rate, if(n_events = 0, NULL, n_duplicates / n_events) AS duplicate_rate, if(n_events = 0, NULL, n_late / n_events) AS late_rate, if(n_on_time = 0, NULL, n_with_page / n_on_time) AS page_completeness, if(n_on_time = 0, NULL, n_with_category / n_on_time) AS category_completeness, if(n_on_time = 0, NULL, n_with_country / n_on_time) AS country_completeness, if(n_on_time = 0, NULL, n_with_device / n_on_time) AS device_completeness, if(n_on_time = 0, NULL, n_with_referrer / n_on_time) AS referrer_completeness, n_lag_events AS lag_events, if(n_lag_events = 0, NULL, n_lag_ms_sum / n_lag_events) AS avg_lag_ms, if(n_lag_events = 0, NULL, n_lag_max) AS max_lag_ms, n_partitions AS partitions FROM (SELECT minute, sum(records) AS n_records, sum(dead_letters) AS n_dead_letters, sum(events) AS n_events, sum(duplicates) AS n_duplicates, sum(late) AS n_late, sum(on_time) AS n_on_time, sum(with_page) AS n_with_page, sum(with_category) AS n_with_category, sum(with_country) AS n_with_country, sum(with_device) AS n_with_device, sum(with_referrer) AS n_with_referrer, sum(lag_events) AS n_lag_events, sum(lag_ms_sum) AS n_lag_ms_sum, maxIf(lag_ms_max, lag_events > 0) AS n_lag_max, uniqExact(`partition`) AS n_partitions FROM clickstream.quality_1m GROUP BY minute) COMMENT 'Data quality per minute over all partitions: validity (dead-letter rate), uniqueness (duplicate rate), completeness of optional fields, freshness (ingest lag)';

CREATE OR REPLACE VIEW clickstream.funnel_daily AS SELECT toDate(ts) AS day, uniqExactIf(user_id, event_type = 'page_view') AS page_view_users, uniqExactIf(user_id, event_type = 'product_view') AS product_view_users, uniqExactIf(user_id, event_type = 'add_to_cart') AS add_to_cart_users, uniqExactIf(user_id, event_type = 'checkout') AS checkout_users, uniqExactIf(user_id, event_type = 'purchase') AS purchase_users, countIf(event_type = 'purchase') AS purchases, sumIf(price * quantity, event_type = 'purchase') AS revenue FROM clickstream.events GROUP BY day COMMENT 'Distinct users reaching each funnel step per UTC day';

CREATE OR REPLACE VIEW clickstream.sessions_daily AS SELECT toDate(session_start) AS day, count() AS sessions, uniqExact(user_id) AS users, avg(events) AS avg_events, avg(dateDiff('millisecond', session_start, session_end)) / 1000 AS avg_duration_s, countIf(purchases > 0) / count() AS conversion_rate, countIf(events = 1) / count() AS bounce_rate, sum(revenue) AS revenue FROM clickstream.sessions GROUP BY day COMMENT 'Closed sessions per UTC day of their start';
