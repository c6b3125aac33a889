"""gpu-pipeline: clickstream analytics, Kafka to ClickHouse, one kernel source for GPU and CPU."""

__version__ = "0.1.0"
