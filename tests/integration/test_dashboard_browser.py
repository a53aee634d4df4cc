"""The dashboard page in headless Chromium against the real stack.

What a user sees must be what `extproc status --json` says (the comparison table cell by cell,
the charts bucket by bucket), and a rollback clicked on the page must reach every sidecar.

Needs Debian's ``chromium`` and ``chromium-driver`` (`make browser`); without them the tests skip,
unless EXTPROC_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from extproc import store
from extproc.config import load_experiment
from extproc.contract import keys
from extproc.dev import stack
from extproc.ops import figures as fig
from extproc.ops import status
from extproc.ops.figures import flatten
from extproc.telemetry import rollup
from extproc.telemetry.events import decode_event
from extproc.telemetry.v1.event_pb2 import Assignment, TelemetryEvent
from extproc.telemetry.writer import TelemetryWriter
from tests.component.test_dashboard import NAME, dashboard, dashboard_experiment, send_traffic
from tests.conftest import LiveStack, start_stack, wait_for, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The machine has no network: without these Chromium waits on lookups it cannot finish.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_S = 20


def chrome(profile: Path, width: int = 1400, height: int = 1000) -> WebDriver:
    """Headless Chromium with a fresh profile in ``profile``."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        why = f"{', '.join(missing)} missing: `make browser` installs chromium and chromium-driver"
        if os.environ.get("EXTPROC_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    require_browser()
    driver = chrome(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    require_browser()
    tmp = tmp_path_factory.mktemp("dashboard-page")
    s = start_stack(tmp / "stack", dashboard_experiment(tmp))
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def until(driver: WebDriver, check: Callable[[WebDriver], Any], what: str) -> Any:
    """Wait on a condition in the page; an element redrawn meanwhile is just looked up again."""
    wait = WebDriverWait(
        driver, WAIT_S, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(check, f"waiting for {what}")


def page_data(driver: WebDriver) -> dict[str, Any]:
    """The API answers the page last drew (window.extproc); empty until the page's script ran."""
    doc: dict[str, Any] | None = driver.execute_script("return window.extproc")
    return doc or {}


def click(driver: WebDriver, css: str) -> None:
    until(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True, f"click {css}")


def drawn_charts(driver: WebDriver) -> dict[tuple[str, str], list[float | None]]:
    """{(figure, line): values} as drawn: each chart line carries its numbers."""
    rows = driver.execute_script(
        """return [...document.querySelectorAll("figure.chart")].flatMap((f) =>
             [...f.querySelectorAll("path.line")].map((p) =>
               [f.dataset.metric, p.dataset.variant, JSON.parse(p.dataset.values)]));"""
    )
    return {(metric, line): values for metric, line, values in rows}


def bucket_figures(s: LiveStack, t: list[float], step_s: float) -> list[dict[str, Any]]:
    """Per bucket of the page's series: `extproc status`'s own summary of that bucket's events,
    read from Redis here."""
    entries = s.redis().xrevrange(keys.events(NAME), count=20_000)
    events = [ev for _id, f in entries if (ev := decode_event(f)) is not None]
    exp = load_experiment(s.experiment_path)
    prices = {v: spec.price for v, spec in exp.spec.variants.items() if spec.price}
    out = []
    for start in t:
        evs = [ev for ev in events if start * 1000 <= ev.time_unix_ms < (start + step_s) * 1000]
        span = rollup.Bucket(rollup.tally(evs))
        per = status.figures_of(span, "assigned", ["stable", "canary"], prices)
        out.append({v: flatten(f) for v, f in per.items()})
        for figures in out[-1].values():
            del figures["open_requests"]  # a figure of now, not charted
    return out


def table_cells(driver: WebDriver) -> list[tuple[str, str, str, Any, str]]:
    """(variant, figure, field, number, text) of every cell of the comparison table."""
    cells = driver.execute_script(
        """return [...document.querySelectorAll("#comparison-table td")].map((c) =>
             [c.dataset.variant, c.dataset.metric, c.dataset.field, JSON.parse(c.dataset.value),
              c.textContent]);"""
    )
    return [tuple(c) for c in cells]


def cli_rows(out: str) -> dict[str, list[str]]:
    """The cells of `extproc status`'s table of assigned traffic, by label: columns are two or
    more spaces apart, a label or a cell holds single spaces at most."""
    rows = {}
    for line in out.split(", not compared:")[0].splitlines():
        label, *cells = re.split(r"\s{2,}", line.strip())
        rows[label] = cells
    return rows


def assert_page_reads_as_the_cli(cells: list[tuple[str, str, str, Any, str]], cli: str) -> None:
    """Every cell's text is the one rule's text of its number, and `extproc status` prints the
    same text for each variant's figure (stable first, then the candidate)."""
    text = {"value": fig.value_text, "diff": fig.diff_text}
    for _variant, metric, field, value, shown in cells:
        want = fig.rel_text(value) if field == "rel" else text[field](metric, value)
        assert shown == want, (metric, field, value)
    values = [(m, t) for _, m, field, _, t in cells if field == "value"]
    rows = cli_rows(cli)
    for metric in dict.fromkeys(m for m, _ in values):
        assert rows[fig.label(metric)] == [t for m, t in values if m == metric], metric


def test_table_and_charts_show_the_figures_of_status(
    page_stack: LiveStack, browser: WebDriver, http: httpx.Client
) -> None:
    s = page_stack
    send_traffic(s, http, 40, "page")  # returns once status counts every request
    st = s.status()
    url, _ = dashboard(s)
    browser.get(f"{url}/")
    until(
        browser,
        lambda d: (
            (page_data(d).get("experiment") or {}).get("window_events") == st["window_events"]
        ),
        "the page to draw the figures after the traffic",
    )

    cells = table_cells(browser)
    shown = {(v, m): value for v, m, field, value, _ in cells if field == "value"}
    expected = {(v, m): x for v, f in st["variants"].items() for m, x in flatten(f).items()}
    assert shown == expected
    text = {(v, m): t for v, m, field, _, t in cells if field == "value"}
    p99 = st["variants"]["canary"]["latency_ms"]["p99"]
    assert text[("canary", "latency_ms.p99")] == fig.value_text("latency_ms.p99", p99)
    cli = s.cli("status")
    assert cli.returncode == 0, cli.stderr
    assert_page_reads_as_the_cli(cells, cli.stdout)
    # The guardrail checks' figures too are shown as the API wrote them.
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#checks-table td"), "checks")
    shown_checks = browser.execute_script(
        """return [...document.querySelectorAll("#checks-table tr.verdict")].map((tr) =>
             [tr.dataset.variant, tr.dataset.metric,
              tr.querySelector("td[data-field=estimate]").textContent,
              tr.querySelector("td[data-field=bound]").textContent]);"""
    )
    assert shown_checks
    items = page_data(browser)["experiment"]["comparison"]["checks"]["items"]
    verdicts = {(c["variant"], c["metric"]): fig.verdict(c)["text"] for c in items}
    for variant, metric, estimate, bound in shown_checks:
        assert [estimate, bound] == [verdicts[(variant, metric)][k] for k in ("estimate", "bound")]
    diffs = {m: value for v, m, field, value, _ in cells if field == "diff"}
    assert diffs["latency_ms.p99"] == pytest.approx(
        p99 - st["variants"]["stable"]["latency_ms"]["p99"]
    )

    # The charts: each point is the figures of its step's requests, as status defines them.
    series = page_data(browser)["series"]
    charts = drawn_charts(browser)
    buckets = bucket_figures(s, series["t"], series["step_s"])
    assert any(b["canary"]["window_requests"] for b in buckets)
    for (metric, variant), values in charts.items():
        if metric != "tokens_per_request":
            assert values == [b[variant][metric] for b in buckets], (metric, variant)
            continue
        for got, b in zip(values, buckets, strict=True):
            n, tokens = b[variant]["window_requests"], b[variant]["completion_tokens"]
            assert got == (pytest.approx(tokens / n) if n else None), variant


EDGE = "edge-figures"


def edge_events(now_ms: int) -> list[TelemetryEvent]:
    """Figures on rounding edges: stable's mean cached prompt tokens 10.25 (exact in binary:
    JavaScript's toFixed(1) says 10.3, Python's f"{x:.1f}" 10.2). Latencies come from sketches
    (within 2%), so their texts are checked against the API's figures, not written out here."""
    out = []
    for i in range(4):
        for variant, duration in (("stable", 10.25), ("canary", 0.15)):
            out.append(
                TelemetryEvent(
                    experiment=EDGE,
                    variant=variant,
                    request_id=f"{variant}-{i}",
                    assignment=Assignment.ASSIGNMENT_STICKY,
                    status=200,
                    time_unix_ms=now_ms - 1000 * i,
                    duration_ms=duration,
                    first_token_ms=2.25 if variant == "stable" else 0.05,
                    prompt_tokens=25,
                    completion_tokens=3,
                    cached_prompt_tokens=10 + (i == 0),
                )
            )
    return out


def test_figures_on_rounding_edges_read_the_same_on_the_page_and_in_the_cli(
    page_stack: LiveStack, browser: WebDriver, tmp_path: Path
) -> None:
    """The page shows the texts the API made by the CLI's rule, never rounding on its own."""
    s = page_stack
    exp = load_experiment(write_experiment(tmp_path, name=EDGE))
    evs = edge_events(int(time.time() * 1000))

    async def seed() -> None:
        r = store.connect(s.redis_url)
        try:
            await store.register_experiment(r, exp)
            writer = TelemetryWriter(r)
            for ev in evs:
                writer.submit(ev)
            await writer.flush()
        finally:
            await r.aclose()

    asyncio.run(seed())
    url, _ = dashboard(s)
    browser.get(f"{url}/?experiment={EDGE}")
    until(
        browser,
        lambda d: (page_data(d).get("experiment") or {}).get("window_events") == len(evs),
        "the page to draw the edge experiment",
    )
    cells = table_cells(browser)
    text = {(v, m, f): t for v, m, f, _, t in cells}
    assert text[("stable", "cached_prompt_tokens", "value")] == "10.3"
    figures = page_data(browser)["experiment"]["variants"]
    for variant in ("stable", "canary"):
        p50 = figures[variant]["latency_ms"]["p50"]
        assert p50 == pytest.approx(10.25 if variant == "stable" else 0.15, rel=rollup.ALPHA)
        assert text[(variant, "latency_ms.p50", "value")] == fig.value_text("latency_ms.p50", p50)
    cli = s.cli("status", EDGE)
    assert cli.returncode == 0, cli.stderr
    assert_page_reads_as_the_cli(cells, cli.stdout)


def sidecars_on(s: LiveStack, version: int) -> bool:
    r = s.redis()
    reps = [r.hgetall(k) for k in r.scan_iter("extproc:sidecar:*")]
    return bool(reps) and all(int(rep[b"routing_version"]) >= version for rep in reps)


def test_rollback_from_the_page_reaches_every_sidecar(
    page_stack: LiveStack, browser: WebDriver
) -> None:
    s = page_stack
    url, token = dashboard(s)
    browser.get(f"{url}/")
    dialog = (By.ID, "confirm")
    commands = s.redis().xlen(keys.commands(NAME))

    click(browser, "button[data-action=pause]")  # changing one's mind records nothing
    until(browser, lambda d: d.find_element(*dialog).get_attribute("open") is not None, "dialog")
    click(browser, "#confirm-cancel")
    until(browser, lambda d: d.find_element(*dialog).get_attribute("open") is None, "cancel")
    assert s.redis().xlen(keys.commands(NAME)) == commands

    click(browser, "button[data-action=rollback]")
    assert "Roll back chat-upgrade?" in browser.find_element(By.ID, "confirm-title").text
    field = browser.find_element(By.ID, "confirm-token")
    field.send_keys("not-the-token")
    click(browser, "#confirm-ok")
    error = until(browser, lambda d: d.find_element(By.ID, "confirm-error"), "an error")
    until(browser, lambda d: error.is_displayed(), "the 401 in the dialog")
    assert error.text.startswith("401")
    assert s.redis().xlen(keys.commands(NAME)) == commands

    field.clear()
    field.send_keys(token)
    click(browser, "#confirm-ok")
    until(browser, lambda d: d.find_element(*dialog).get_attribute("open") is None, "the close")
    toast = browser.find_element(By.ID, "toast")
    assert toast.text.startswith("rollback recorded")

    def rolled_back() -> int | None:
        routing = json.loads(s.redis().get(keys.routing(NAME)))
        return int(routing["version"]) if routing["weights"]["canary"] == 0 else None

    version = wait_for(rolled_back, "the evaluator to set the canary's weight to 0")
    wait_for(lambda: sidecars_on(s, version), f"every sidecar to apply routing {version}")
    until(
        browser,
        lambda d: "rolled_back" in d.find_element(By.CSS_SELECTOR, "#summary .badge").text,
        "the page to show the rollback",
    )
    latest = browser.find_element(By.CSS_SELECTOR, "#timeline > li")
    assert latest.get_attribute("data-action") == "rollback"
    assert "by dashboard" in latest.text
