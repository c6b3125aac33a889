"""gpu-pipeline: clickstream analytics from Kafka to ClickHouse on one kernel source for GPU and CPU."""

__version__ = "0.1.0"
