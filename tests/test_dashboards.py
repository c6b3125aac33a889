"""The Grafana dashboards and provisioning of ``deploy/grafana`` against a real run.

One pipeline job (``gpu-pipeline run`` as a child process: synthetic source, embedded
ClickHouse, ``--metrics-port``) feeds every check.  While it runs, its Prometheus endpoint is
scraped; once it has exited, its chdb folder is opened here.  Then:

* every ClickHouse panel query has its Grafana macros expanded, exactly as the
  grafana-clickhouse-datasource plugin expands them, for a time range covering the data, and
  runs on that folder: it must succeed and return rows holding something other than zeros;
* every PromQL expression may only name series the endpoint serves (``_total``, ``_bucket``,
  ``_sum``, ``_count`` as prometheus-client writes them), grouped by labels those series carry;
* every datasource a panel names is provisioned, with the type the panel expects.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gpu_pipeline import schema
from gpu_pipeline.sinks import ddl
from gpu_pipeline.sinks.clickhouse import ClickHouseSink, parse_sink_url
from tests.pipeline_runs import REPO_ROOT, Job

GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "datasources.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
COMPOSE = REPO_ROOT / "deploy" / "docker-compose.yml"
CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"
PROMETHEUS_TYPE = "prometheus"
DATABASE = "clickstream"
NEEDS_SOURCE_TIMESTAMPS = frozenset({"Ingest lag (Kafka message time - event time)"})
"""Panels that only have values for a source with record timestamps (Kafka): the synthetic run
here gives them rows of NULLs; tests/test_quality.py checks the figures on a real broker."""
EVENTS = 10_000
"""Enough for every panel to have data (the stream has ~0.1% dead letters and late events) and
for 100 batches, so that the endpoint is scraped while the run works."""


# ---------------------------------------------------------------------------- dashboards


@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    dashboard: str
    panel: dict[str, Any]
    target: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel['title']} / {self.target['refId']}"

    @property
    def datasource_type(self) -> str:
        return str(self.target["datasource"]["type"])


def load_dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON."""
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    return {path.name: json.loads(path.read_text()) for path in files}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def all_targets() -> list[Target]:
    return [
        Target(dashboard["title"], panel, target)
        for dashboard in load_dashboards().values()
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def clickhouse_targets() -> list[Target]:
    return [t for t in all_targets() if t.datasource_type == CLICKHOUSE_TYPE]


def prometheus_targets() -> list[Target]:
    return [t for t in all_targets() if t.datasource_type == PROMETHEUS_TYPE]


# ---------------------------------------------------------------------------- macros


@dataclass(frozen=True)
class TimeRange:
    """The dashboard time range and the panel interval, in whole seconds."""

    from_s: int
    to_s: int
    interval_s: int


_MACRO = re.compile(r"\$__(\w+)")


def _argument(sql: str, start: int, macro: str) -> tuple[str, int]:
    """The parenthesised argument of a macro whose name ends at ``start``, and where it ends."""
    if start >= len(sql) or sql[start] != "(":
        raise ValueError(f"$__{macro} needs an argument in parentheses")
    depth = 0
    for pos in range(start, len(sql)):
        depth += {"(": 1, ")": -1}.get(sql[pos], 0)
        if depth == 0:
            argument = sql[start + 1 : pos].strip()
            if not argument or "," in argument:
                raise ValueError(f"$__{macro} takes one column, got {argument!r}")
            return argument, pos + 1
    raise ValueError(f"unbalanced parentheses after $__{macro}")


def expand_macros(sql: str, window: TimeRange) -> str:
    """``sql`` with the plugin's time macros replaced as the plugin does (pkg/macros), for the
    macros the dashboards use; any other ``$__`` macro or ``$`` variable is an error."""
    start, end = f"toDateTime({window.from_s})", f"toDateTime({window.to_s})"
    out: list[str] = []
    pos = 0
    for match in _MACRO.finditer(sql):
        if match.start() < pos:
            raise ValueError(f"macro inside a macro argument: {sql[match.start() :]!r}")
        out.append(sql[pos : match.start()])
        name, pos = match.group(1), match.end()
        if name == "timeFilter":
            column, pos = _argument(sql, pos, name)
            out.append(f"{column} >= {start} AND {column} <= {end}")
        elif name == "timeInterval":
            column, pos = _argument(sql, pos, name)
            seconds = max(window.interval_s, 1)
            out.append(f"toStartOfInterval(toDateTime({column}), INTERVAL {seconds} second)")
        elif name in ("fromTime", "toTime"):
            out.append(start if name == "fromTime" else end)
        else:
            raise ValueError(f"unknown macro $__{name}")
    out.append(sql[pos:])
    expanded = "".join(out)
    if "$" in expanded:
        raise ValueError(f"a variable the test cannot expand is left in {expanded!r}")
    return expanded


def test_the_macro_expander_follows_the_plugin() -> None:
    window = TimeRange(1415792726, 1447328726, 20)
    assert expand_macros("WHERE $__timeFilter(time)", window) == (
        "WHERE time >= toDateTime(1415792726) AND time <= toDateTime(1447328726)"
    )
    assert expand_macros("SELECT $__timeInterval(ts) AS t", window) == (
        "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 20 second) AS t"
    )
    assert expand_macros("day >= toDate($__fromTime)", window) == (
        "day >= toDate(toDateTime(1415792726))"
    )
    for bad in ("$__timeFilter_ms(ts)", "$__interval_s", "$__timeFilter", "x = $var"):
        with pytest.raises(ValueError):
            expand_macros(bad, window)


def _seconds(interval: str) -> int:
    """A Grafana panel interval such as ``1m`` or ``30s`` in seconds."""
    found = re.fullmatch(r"(\d+)(s|m|h)", interval)
    assert found, f"unexpected panel interval {interval!r}"
    return int(found.group(1)) * {"s": 1, "m": 60, "h": 3600}[found.group(2)]


# ---------------------------------------------------------------------------- PromQL

_PROMQL_CALLS = frozenset(
    {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile"}
)
_PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names an expression reads and the label names it groups by."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, $__rate_interval included
    groups = [label.strip() for group in _GROUPING.findall(text) for label in group.split(",")]
    labels = {label for label in groups if label}
    text = _GROUPING.sub("", text)
    assert "$" not in text, f"a Grafana variable outside a range selector: {expr}"
    names: set[str] = set()
    for found in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = found.group(1), found.group(2)
        if call:
            assert word in _PROMQL_CALLS, f"unexpected PromQL function {word} in {expr}"
        elif word not in _PROMQL_KEYWORDS:
            names.add(word)
    return names, labels


def test_the_promql_reader_finds_names_and_labels() -> None:
    names, labels = promql_names(
        'histogram_quantile(0.99, sum by (le, x) (rate(a_bucket{k="v"}[$__rate_interval])))'
        " / sum(rate(b_total[5m]))"
    )
    assert names == {"a_bucket", "b_total"}
    assert labels == {"le", "x"}


# ---------------------------------------------------------------------------- the run


@dataclass
class Exposition:
    """What the endpoint served during the run, over all scrapes."""

    scrapes: int = 0
    types: dict[str, str] = field(default_factory=dict)
    """Family name -> type, from the ``# TYPE`` lines (empty families included)."""
    labels: dict[str, set[str]] = field(default_factory=dict)
    """Sample name -> the label names seen on it (only samples that appeared)."""
    records: float = 0.0

    def add(self, text: str) -> None:
        self.scrapes += 1
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                if sample.name == "gpu_pipeline_records_total":
                    self.records = max(self.records, sample.value)

    def series_names(self) -> set[str]:
        """Every sample name the families declare, whether or not a sample appeared."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names = set(self.labels)
        for name, kind in self.types.items():
            names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
        return names


@dataclass(frozen=True)
class Run:
    sink_dir: Path
    exposition: Exposition
    window: TimeRange


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _open_sink(sink_dir: Path) -> ClickHouseSink:
    sink = ClickHouseSink(parse_sink_url(f"chdb://{sink_dir}", DATABASE))
    sink.open()
    return sink


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One job run to its end, scraped while it works; its data range in seconds."""
    root = tmp_path_factory.mktemp("dashboards")
    port = _free_port()
    job = Job(
        source="synthetic",
        sink_dir=root / "ch",
        checkpoint_dir=root / "ckpt",
        logs=root / "logs",
        batch_size=100,
        options=("--events", str(EVENTS), "--checkpoint-interval", "0",
                 "--metrics-port", str(port)),
    )  # fmt: skip
    child = job.start()
    exposition = Exposition()
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            exposition.add(_scrape(port))
        time.sleep(0.1)
    code = job.wait(child)
    assert code == 0, f"run exited with {code}:\n{job.log_tail()}"
    assert exposition.records > 0, f"no scrape while the run worked:\n{job.log_tail()}"
    sink = _open_sink(job.sink_dir)
    try:
        bounds = sink.query(
            f"SELECT toUnixTimestamp64Milli(min(ts)) AS lo, toUnixTimestamp64Milli(max(ts)) AS hi "
            f"FROM {DATABASE}.events"
        ).to_pylist()[0]
    finally:
        sink.close()
    window = TimeRange(bounds["lo"] // 1000 - 3600, math.ceil(bounds["hi"] / 1000) + 3600, 0)
    return Run(job.sink_dir, exposition, window)


# ---------------------------------------------------------------------------- ClickHouse

_TABLES = {spec.name for spec in ddl.TABLES} | set(ddl.view_names())
_VERSIONED_READ = re.compile(
    rf"FROM\s+{DATABASE}\.({'|'.join(sorted(schema.VERSIONED_TABLES))})\b(?!\s+FINAL)"
)
_TIME_MACROS = ("$__timeFilter(", "$__fromTime", "$__toTime")


def _has_a_value(table: pa.Table) -> bool:
    """Some cell outside the time column is a non-zero number or a non-empty string."""
    for name in table.column_names:
        if name == "time":
            continue
        for value in table.column(name).to_pylist():
            if value is not None and value != 0 and value != "" and value == value:  # not NaN
                return True
    return False


def _check_sql_shape(item: Target) -> None:
    sql = item.target["rawSql"]
    tables = set(re.findall(rf"\b{DATABASE}\.(\w+)", sql))
    assert tables, f"{item.name}: names no {DATABASE} table"
    assert tables <= _TABLES, f"{item.name}: unknown tables {tables - _TABLES}"
    if not any(macro in sql for macro in _TIME_MACROS):
        assert tables == {"dead_letters"}, f"{item.name}: ignores the dashboard time range"
    for found in _VERSIONED_READ.finditer(sql):
        # a bare versioned table holds every version of a window: only its window bounds
        # can be read without FINAL
        assert sql[: found.start()].rstrip().endswith("SELECT max(window_start)"), (
            f"{item.name}: reads {found.group(1)} without FINAL (use {found.group(1)}_total)"
        )


@pytest.mark.parametrize("item", clickhouse_targets(), ids=lambda item: item.name)
def test_a_clickhouse_panel_query_runs_and_has_rows(run: Run, item: Target) -> None:
    target, panel = item.target, item.panel
    assert target.get("editorType") == "sql" and target.get("rawSql"), item.name
    timeseries = panel["type"] == "timeseries"
    assert target.get("format") == (0 if timeseries else 1), f"{item.name}: format"
    assert target.get("queryType") == ("timeseries" if timeseries else "table"), item.name
    _check_sql_shape(item)
    interval = max(_seconds(panel.get("interval", "1s")), 20)
    window = TimeRange(run.window.from_s, run.window.to_s, interval)
    sql = expand_macros(target["rawSql"], window)
    sink = _open_sink(run.sink_dir)
    try:
        result = sink.query(sql)
        columns = sink.query(f"DESCRIBE ({sql})").to_pylist() if timeseries else []
    finally:
        sink.close()
    assert result.num_rows > 0, f"{item.name}: no rows from\n{sql}"
    if panel["title"] not in NEEDS_SOURCE_TIMESTAMPS:
        assert _has_a_value(result), f"{item.name}: only zeros and nulls from\n{sql}"
    if timeseries:
        assert columns[0]["name"] == "time", f"{item.name}: the first column must be time"
        assert columns[0]["type"].startswith("DateTime"), f"{item.name}: {columns[0]}"
        times = result.column(0).to_pylist()
        assert times == sorted(times), f"{item.name}: not in time order"


def test_top_products_count_every_event_once(run: Run) -> None:
    """The aligned 5-minute windows the top-products panel sums tile the time line."""
    sink = _open_sink(run.sink_dir)
    try:
        row = sink.query(
            f"SELECT (SELECT sum(views) FROM {DATABASE}.product_5m_total "
            f"WHERE toUnixTimestamp(window_start) % 300 = 0) AS windows, "
            f"(SELECT countIf(event_type = 'product_view') FROM {DATABASE}.events) AS events"
        ).to_pylist()[0]
    finally:
        sink.close()
    assert row["windows"] == row["events"] > 0


# ---------------------------------------------------------------------------- Prometheus


@pytest.mark.parametrize("item", prometheus_targets(), ids=lambda item: item.name)
def test_a_prometheus_panel_reads_only_served_metrics(run: Run, item: Target) -> None:
    expr = item.target.get("expr", "")
    names, labels = promql_names(expr)
    assert names, f"{item.name}: no metric in {expr!r}"
    served = run.exposition.series_names()
    assert names <= served, f"{item.name}: not served: {sorted(names - served)}"
    seen = [run.exposition.labels[name] for name in names if name in run.exposition.labels]
    if seen:  # the Kafka-only consumer lag has no series in a synthetic run
        carried = set().union(*seen)
        assert labels <= carried, f"{item.name}: no such labels {sorted(labels - carried)}"


def test_every_served_metric_has_a_panel(run: Run) -> None:
    used = {name for item in prometheus_targets() for name in promql_names(item.target["expr"])[0]}
    assert run.exposition.scrapes > 1
    for family, kind in run.exposition.types.items():
        if not family.startswith("gpu_pipeline_") or family.endswith("_created"):
            continue  # _created: when a histogram began, not a figure to chart
        names = Exposition(types={family: kind}).series_names()
        assert names & used, f"no panel shows {family} ({kind})"


# ---------------------------------------------------------------------------- provisioning


def _datasources() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    sources = config["datasources"]
    uids = [source["uid"] for source in sources]
    assert len(uids) == len(set(uids)), uids
    return {source["uid"]: source for source in sources}


def test_the_datasources_are_provisioned_as_the_stack_needs() -> None:
    by_type = {source["type"]: source for source in _datasources().values()}
    clickhouse = by_type[CLICKHOUSE_TYPE]
    expected = {
        "host": "clickhouse",
        "port": 8123,
        "protocol": "http",
        "username": "reader",
        "defaultDatabase": DATABASE,
    }
    assert {key: clickhouse["jsonData"].get(key) for key in expected} == expected
    assert clickhouse["secureJsonData"] == {"password": "${CLICKHOUSE_READER_PASSWORD}"}
    assert by_type[PROMETHEUS_TYPE]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]
    assert all(p["type"] == "file" for p in providers)


def test_every_datasource_a_panel_names_is_provisioned() -> None:
    sources = _datasources()
    for item in all_targets():
        for ref in (item.panel["datasource"], item.target["datasource"]):
            assert ref["uid"] in sources, f"{item.name}: datasource {ref} is not provisioned"
            assert ref["type"] == sources[ref["uid"]]["type"], f"{item.name}: {ref}"
        assert item.panel["datasource"] == item.target["datasource"], item.name
    assert clickhouse_targets() and prometheus_targets()


def test_the_dashboards_are_well_formed() -> None:
    dashboards = load_dashboards()
    uids = [dashboard["uid"] for dashboard in dashboards.values()]
    assert len(uids) == len(set(uids)), uids
    for name, dashboard in dashboards.items():
        assert dashboard["schemaVersion"] >= 39, name
        assert dashboard["title"] and dashboard["panels"], name
        ids = [panel["id"] for panel in dashboard["panels"]]
        ids += [nested["id"] for p in dashboard["panels"] for nested in p.get("panels", [])]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"{name}: {panel['title']}"
            assert panel.get("description"), f"{name}: {panel['title']} has no description"
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), f"{name}: {panel['title']}"


def test_compose_mounts_the_provisioning() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    if "grafana" not in services:
        pytest.skip("deploy/docker-compose.yml has no grafana service")
    grafana = services["grafana"]
    mounts: dict[str, str] = {}
    for volume in grafana.get("volumes", []):
        if isinstance(volume, dict):  # the long syntax
            mounts[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            mounts[target] = source
    assert Path(mounts["/etc/grafana/provisioning"]).parts[-2:] == ("grafana", "provisioning")
    assert Path(mounts["/var/lib/grafana/dashboards"]).parts[-2:] == ("grafana", "dashboards")
    assert "CLICKHOUSE_READER_PASSWORD" in json.dumps(grafana.get("environment", {}))
    assert CLICKHOUSE_TYPE in json.dumps(grafana)
