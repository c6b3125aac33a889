"""The parameters of the streaming semantics (SPEC §2), as one frozen, validated value.

Every operator receives the part of this it needs; nothing else configures behaviour.
All durations are integer milliseconds and say so in their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpu_pipeline.errors import ConfigError

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS


@dataclass(frozen=True)
class WindowSpec:
    """One event-time window table: windows ``[s, s + size)`` with ``s`` a multiple of ``slide``.

    ``key`` is the dimension column (``event_type`` or ``product_id``); events without a
    value for it do not count in this table.  Tumbling windows have ``slide_ms == size_ms``.
    """

    table: str
    size_ms: int
    slide_ms: int
    key: str

    def __post_init__(self) -> None:
        if self.size_ms <= 0:
            raise ConfigError(f"windows.{self.table}.size", "must be a positive duration")
        if self.slide_ms <= 0 or self.size_ms % self.slide_ms:
            raise ConfigError(
                f"windows.{self.table}.slide", "must be positive and divide the window size"
            )
        if self.key not in ("event_type", "product_id"):
            raise ConfigError(f"windows.{self.table}.key", "must be event_type or product_id")

    @property
    def windows_per_event(self) -> int:
        """How many windows hold any one timestamp."""
        return self.size_ms // self.slide_ms


DEFAULT_WINDOWS: tuple[WindowSpec, ...] = (
    WindowSpec("traffic_1m", MINUTE_MS, MINUTE_MS, "event_type"),
    WindowSpec("product_5m", 5 * MINUTE_MS, MINUTE_MS, "product_id"),
)


@dataclass(frozen=True)
class Semantics:
    """SPEC §2 parameters: watermark delay D, allowed lateness L, dedup TTL, session gap G,
    and the event-time guard's bound B (``max_future_skew_ms``, 0 = off; §2.9)."""

    max_out_of_orderness_ms: int = 5 * SECOND_MS
    allowed_lateness_ms: int = 60 * SECOND_MS
    dedup_ttl_ms: int = HOUR_MS
    session_gap_ms: int = 30 * MINUTE_MS
    windows: tuple[WindowSpec, ...] = field(default=DEFAULT_WINDOWS)
    max_future_skew_ms: int = HOUR_MS

    def __post_init__(self) -> None:
        for name in (
            "max_out_of_orderness_ms",
            "allowed_lateness_ms",
            "dedup_ttl_ms",
            "session_gap_ms",
            "max_future_skew_ms",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    name, f"must be a non-negative integer of milliseconds, got {value!r}"
                )
        tolerance = self.max_out_of_orderness_ms + self.allowed_lateness_ms
        if 0 < self.max_future_skew_ms < tolerance:
            raise ConfigError(
                "max_future_skew_ms",
                f"must be 0 (guard off) or at least max_out_of_orderness + allowed_lateness "
                f"({tolerance} ms): an event that trails by less than that is still counted, "
                f"so it cannot contradict the event before it, got {self.max_future_skew_ms}",
            )
