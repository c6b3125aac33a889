-- The clickstream job written as one SQL script for embedded ClickHouse (chdb): the peer
-- that benchmarks/bench_peers.py measures gpu-pipeline against.  {path} is the NDJSON file.
--
-- Same outputs, persisted in MergeTree tables: events deduplicated by event_id (first
-- arrival wins), 30-minute sessions per user, 1-minute tumbling traffic per event_type and
-- 5-minute windows sliding by 1 minute per product_id, with exact distinct users.  What it
-- does not do (and gpu-pipeline does): watermarks, lateness and the dedup TTL (it sees the
-- whole file at once), the exact validation contract (it keeps what parses with the types
-- below), dead letters, exactly-once and incremental output.

CREATE DATABASE IF NOT EXISTS peer;

CREATE TABLE peer.events ENGINE = MergeTree ORDER BY (user_id, ts) AS
SELECT event_id, assumeNotNull(user_id) AS user_id, assumeNotNull(ts) AS ts, event_type, page,
       product_id, price, quantity
FROM
(
    SELECT
        rowNumberInAllBlocks() AS pos,
        JSONExtractString(line, 'event_id') AS event_id,
        JSONExtract(line, 'user_id', 'Nullable(Int64)') AS user_id,
        if(JSONType(line, 'ts') = 'Int64',
           fromUnixTimestamp64Milli(JSONExtractInt(line, 'ts'), 'UTC'),
           parseDateTime64BestEffortOrNull(JSONExtractString(line, 'ts'), 3, 'UTC')) AS ts,
        JSONExtractString(line, 'event_type') AS event_type,
        JSONExtract(line, 'page', 'Nullable(String)') AS page,
        JSONExtract(line, 'product_id', 'Nullable(Int64)') AS product_id,
        JSONExtract(line, 'price', 'Nullable(Float64)') AS price,
        coalesce(JSONExtract(line, 'quantity', 'Nullable(Int32)'), 1) AS quantity
    FROM file('{path}', 'LineAsString', 'line String')
    WHERE isValidJSON(line)
)
WHERE event_id != '' AND length(event_id) <= 64 AND user_id IS NOT NULL AND ts IS NOT NULL
  AND event_type IN ('page_view', 'product_view', 'search', 'add_to_cart',
                     'remove_from_cart', 'checkout', 'purchase')
ORDER BY pos
LIMIT 1 BY event_id;

CREATE TABLE peer.sessions ENGINE = MergeTree ORDER BY (session_start, user_id) AS
SELECT user_id, session, min(ts) AS session_start, max(ts) AS session_end, count() AS events,
       countIf(event_type = 'purchase') AS purchases,
       sumIf(price * quantity, event_type = 'purchase') AS revenue
FROM
(
    SELECT user_id, ts, event_type, price, quantity,
           sum(gap) OVER (PARTITION BY user_id ORDER BY ts ROWS UNBOUNDED PRECEDING) AS session
    FROM
    (
        SELECT user_id, ts, event_type, price, quantity,
               if(dateDiff('millisecond',
                           lagInFrame(ts, 1, ts) OVER (PARTITION BY user_id ORDER BY ts
                               ROWS BETWEEN 1 PRECEDING AND CURRENT ROW), ts) > 1800000,
                  1, 0) AS gap
        FROM peer.events
    )
)
GROUP BY user_id, session;

CREATE TABLE peer.traffic_1m ENGINE = MergeTree ORDER BY (window_start, event_type) AS
SELECT toStartOfMinute(ts) AS window_start, event_type, count() AS events,
       uniqExact(user_id) AS users, sumIf(price * quantity, event_type = 'purchase') AS revenue
FROM peer.events
GROUP BY window_start, event_type;

CREATE TABLE peer.product_5m ENGINE = MergeTree ORDER BY (window_start, product_id) AS
SELECT toStartOfMinute(ts) - toIntervalMinute(k) AS window_start, product_id,
       countIf(event_type = 'product_view') AS views,
       countIf(event_type = 'add_to_cart') AS add_to_carts,
       countIf(event_type = 'purchase') AS purchases,
       sumIf(price * quantity, event_type = 'purchase') AS revenue,
       uniqExact(user_id) AS users
FROM
(
    SELECT ts, assumeNotNull(product_id) AS product_id, event_type, price, quantity, user_id
    FROM peer.events
    WHERE isNotNull(events.product_id)
)
ARRAY JOIN range(5) AS k
GROUP BY window_start, product_id;
