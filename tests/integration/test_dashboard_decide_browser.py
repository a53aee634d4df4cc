"""What an operator decides from, in headless Chromium: the dashboard on a Redis seeded with an
experiment, its rollout state and an evaluator's look, so each test states exactly what the
evaluator published and checks what the page makes of it.

No Envoy, sidecar or evaluator runs here: the page reads only Redis, and a seeded look is the
only way to show a failing guardrail or a rolled-back rollout without waiting for one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select

from extproc import store
from extproc.config import load_experiment
from extproc.contract import keys
from extproc.ops import figures as fig
from extproc.telemetry.v1.event_pb2 import Assignment, ErrorClass, TelemetryEvent
from extproc.telemetry.writer import TelemetryWriter
from tests.component.test_dashboard import own_dashboard
from tests.conftest import write_experiment
from tests.integration.test_dashboard_browser import chrome, page_data, require_browser, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NAME = "chat-upgrade"
TOKEN = "decide-t0ken"
STAGES = [2, 5, 10, 25, 50, 100]
# The failing p99 of the issue: +870.9% with the evaluator's bound, its evidence past the
# threshold the evaluator wrote into its detail.
FAILING = {
    "variant": "canary",
    "metric": "latency_p99",
    "action": "rollback",
    "status": "fail",
    "estimate": 8.709,
    "bound": 6.2,
    "margin": 0.5,
    "detail": "latency_p99: 40/120 beyond 150 ms vs stable 2/2000 beyond 100 ms (tail ratio "
    "9.71); evidence e=77.4 over the rollout (fails at 60): worse beyond the margin",
    "log_e": 4.35,
    "evidence": 4.349,
    "parts": {"": 4.35},
    "reference": 100.0,
    "threshold": 60.0,
}
WAITING = {
    "variant": "canary",
    "metric": "error_rate",
    "action": "rollback",
    "status": "waiting",
    "estimate": None,
    "bound": None,
    "margin": 0.5,
    "detail": "12/100 candidate requests",
    "have": 12,
    "need": 100,
    "counting": "candidate requests",
    "log_e": None,
    "evidence": None,
    "parts": {},
    "reference": None,
}
PASSING = {
    "variant": "canary",
    "metric": "cost_per_request",
    "action": "warn",
    "status": "pass",
    "estimate": 0.309,
    "bound": 0.21,
    "margin": 0.5,
    "detail": "cost_per_request mean +31% vs stable (bound +21%, limit +50%); evidence e=0.5 "
    "over the rollout (fails at 20)",
    "log_e": -0.69,
    "evidence": -0.69,
    "parts": {"": -0.69},
    "reference": None,
    "threshold": 20.0,
}


# Collects the page's uncaught errors (a script injected before the page's own, which the
# page's Content-Security-Policy does not govern), so every test can require none.
CATCH_ERRORS = """window.__errors = [];
addEventListener("error", (e) => window.__errors.push(String(e.message)));
addEventListener("unhandledrejection", (e) => window.__errors.push(String(e.reason)));"""


def catching(driver: WebDriver) -> WebDriver:
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH_ERRORS})
    return driver


def page_errors(driver: WebDriver) -> list[str]:
    errors: list[str] = driver.execute_script("return window.__errors || []")
    return errors


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    require_browser()
    driver = catching(chrome(tmp_path_factory.mktemp("chromium")))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def no_script_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, the page it drove threw nothing."""
    yield
    for name in ("browser", "phone"):
        if name in request.fixturenames:
            assert page_errors(request.getfixturevalue(name)) == []


@pytest.fixture(scope="module")
def page(redis_url: str) -> Iterator[str]:
    """`extproc dashboard` on the module's Redis, with a known token."""
    with own_dashboard(redis_url, "--token", TOKEN) as (url, _line):
        yield url


def seed(
    redis_url: str,
    tmp: Path,
    *,
    status: str = "running",
    stage: int = 2,
    checks: list[dict[str, Any]] | None = None,
    weights: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    events: Sequence[TelemetryEvent] = (),
    audit: Sequence[dict[str, Any]] = (),
    guardrails: list[dict[str, Any]] | None = None,
) -> None:
    """An experiment in Redis as an evaluator leaves it: rollout state, routing, its newest look
    (with ``checks``), its decisions (``audit``) and the requests of ``events``."""
    changes: dict[str, Any] = {"rollout": {"stages": STAGES, "cadence_s": 5}}
    if guardrails is not None:
        changes["guardrails"] = guardrails
    exp = load_experiment(write_experiment(tmp, **changes))
    now = time.time()

    async def run() -> None:
        r = store.connect(redis_url)
        try:
            await r.flushdb()
            await store.register_experiment(r, exp)
            if weights is not None:
                await store.set_weights(r, exp, weights, reason=status, actor="evaluator")
            state = {
                "status": status,
                "stage": stage,
                "stage_started": now - 60,
                "strategy": "canary",
                "commands_seen": "0-0",
                "last_action": "",
                "last_reasons": [],
                "updated": now,
                "evidence": {},
            }
            await r.set(keys.rollout(NAME), json.dumps(state))
            look = {
                "time": now,
                "stage": stage,
                "status": status,
                "variants": {},
                "feedback_unattributed": 0,
                "action": "rollback" if status == "rolled_back" else "none",
                "reasons": [],
                "checks": checks or [],
                "srm_p": None,
            } | (extra or {})
            await r.set(keys.evaluation(NAME), json.dumps(look))
            for rec in audit:
                await r.xadd(keys.audit(NAME), {"j": json.dumps(rec)})
            writer = TelemetryWriter(r)
            for ev in events:
                writer.submit(ev)
            await writer.flush()
        finally:
            await r.aclose()

    asyncio.run(run())


def open_page(browser: WebDriver, url: str, what: str) -> None:
    browser.get(f"{url}/?experiment={NAME}")
    until(browser, lambda d: (page_data(d).get("experiment") or {}).get("rollout"), what)


def row(browser: WebDriver, metric: str) -> dict[str, Any]:
    """A guardrail row as drawn: its state, class, and each field's number, text and colour."""
    doc: dict[str, Any] = browser.execute_script(
        """const tr = document.querySelector(`#checks-table tr[data-metric="${arguments[0]}"]`);
           if (!tr) return null;
           const cells = {};
           for (const td of tr.querySelectorAll("td[data-field]")) {
             cells[td.dataset.field] = {
               value: td.dataset.value === undefined ? null : JSON.parse(td.dataset.value),
               text: td.textContent, colour: getComputedStyle(td).color,
               progress: td.dataset.progress === undefined ? null : JSON.parse(td.dataset.progress),
             };
           }
           return {state: tr.dataset.state, cls: tr.className, cells,
                   background: getComputedStyle(tr).backgroundColor,
                   bar: !!tr.querySelector("svg.interval .range")};""",
        metric,
    )
    return doc


def test_a_failing_metric_shows_its_interval_in_red_and_a_waiting_one_what_it_needs(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(redis_url, tmp_path, checks=[FAILING, WAITING, PASSING])
    open_page(browser, page, "the seeded look")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#checks-table tr.verdict"), "rows")

    failing = row(browser, "latency_p99")
    assert failing["state"] == "failing"
    cells = failing["cells"]
    assert cells["label"]["text"] == "p99 latency (ms)"  # the registry's label and unit
    assert cells["estimate"]["text"] == "+870.9%"
    assert cells["bound"]["text"] == "\u2265 +620.0%"
    assert cells["margin"]["text"] == "+50.0%"
    assert cells["evidence"]["text"] == "e = 77 of 60 needed"
    assert cells["evidence"]["progress"] == 1.0
    assert cells["estimate"]["colour"] == "rgb(197, 48, 48)"  # --fail
    assert failing["background"] != "rgba(0, 0, 0, 0)"
    assert failing["bar"]

    waiting = row(browser, "error_rate")
    assert waiting["state"] == "waiting"
    assert waiting["cells"]["label"]["text"] == fig.label("error_rate")
    assert waiting["cells"]["evidence"]["text"] == "needs 88 more candidate requests (12 of 100)"
    assert waiting["cells"]["estimate"]["text"] == fig.MISSING  # no samples, no figures
    assert not waiting["bar"]

    passing = row(browser, "cost_per_request")
    assert passing["state"] == "passing"
    assert passing["cells"]["label"]["text"] == "cost per request (currency units)"
    assert passing["cells"]["evidence"]["text"] == "e = 0.50 of 20 needed"
    assert passing["cells"]["evidence"]["progress"] == 0.0
    assert passing["cells"]["estimate"]["colour"] == "rgb(47, 133, 90)"  # --pass
    # The comparison's p99 change is coloured as its guardrail's verdict.
    rel = browser.find_element(
        By.CSS_SELECTOR,
        '#comparison-table td[data-variant="canary"][data-metric="latency_ms.p99"]'
        '[data-field="rel"]',
    )
    assert "judged-failing" in (rel.get_attribute("class") or "")
    # Every text is the one the CLI's rule makes of the same check.
    for check in (FAILING, WAITING, PASSING):
        shown = row(browser, check["metric"])["cells"]
        want = fig.verdict(check)["text"]
        assert shown["estimate"]["text"] == want["estimate"]
        assert shown["bound"]["text"] == want["bound"]


def buttons(browser: WebDriver) -> dict[str, bool]:
    """{action: enabled} of the summary's buttons."""
    found: dict[str, bool] = browser.execute_script(
        """return Object.fromEntries([...document.querySelectorAll("#actions button")].map(
             (b) => [b.dataset.action, !b.disabled]));"""
    )
    return found


def polls(browser: WebDriver, n: int) -> None:
    """Return once the page has drawn ``n`` more answers of the API (its own 2 s poll)."""
    start = page_data(browser)["updated"]
    seen: list[float] = []

    def more(d: WebDriver) -> bool:
        t = page_data(d)["updated"]
        if t != start and t not in seen:
            seen.append(t)
        return len(seen) >= n

    until(browser, more, f"{n} more polls")


def test_after_a_rollback_only_restart_is_enabled(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(
        redis_url,
        tmp_path,
        status="rolled_back",
        checks=[FAILING],
        weights={"stable": 100, "canary": 0},
    )
    open_page(browser, page, "the rolled-back experiment")
    until(browser, lambda d: buttons(d), "the buttons")
    assert buttons(browser) == {
        "pause": False,
        "resume": False,
        "promote": False,
        "rollback": False,
        "abort": False,
        "restart": True,
    }


def test_an_ab_run_shows_its_stated_decision_as_status_states_it(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    from extproc.evaluator import decision
    from tests.unit.test_ab_decision import arm, spec_with

    # A slower candidate on the primary metric: keep stable.
    found = decision.decide(spec_with(primary="latency"), "canary", arm(1), arm(2, latency=900))
    doc = found.to_json()
    seed(redis_url, tmp_path, status="completed", extra={"decisions": [doc]})
    open_page(browser, page, "the finished A/B run")
    card = until(browser, lambda d: d.find_element(By.ID, "decision-card"), "the decision card")
    until(browser, lambda d: card.is_displayed(), "the decision card shown")
    shown = [e.text for e in card.find_elements(By.CSS_SELECTOR, "#decision > *")]
    assert shown == [line.strip() for line in decision.render(doc)]
    assert shown[0].startswith("A/B decision for canary: KEEP STABLE")
    # A rollout without one shows no card.
    seed(redis_url, tmp_path)
    open_page(browser, page, "a canary")
    until(browser, lambda d: not d.find_element(By.ID, "decision-card").is_displayed(), "no card")


def test_a_running_rollout_offers_what_the_evaluator_would_apply_and_abort_records_it(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(redis_url, tmp_path, status="running", checks=[PASSING])
    open_page(browser, page, "the running experiment")
    until(browser, lambda d: buttons(d), "the buttons")
    assert buttons(browser) == {
        "pause": True,
        "resume": False,
        "promote": True,
        "rollback": True,
        "abort": True,
        "restart": False,
    }
    # Polls that change nothing leave the buttons in place: a click lands where it was aimed.
    browser.execute_script(
        """document.querySelector("#actions button[data-action=abort]").dataset.mark = "kept";
           document.querySelector("#summary h2").dataset.mark = "kept";"""
    )
    polls(browser, 2)
    assert browser.execute_script(
        """return [document.querySelector("#actions button[data-action=abort]").dataset.mark,
                   document.querySelector("#summary h2").dataset.mark];"""
    ) == ["kept", "kept"]

    browser.find_element(By.CSS_SELECTOR, "#actions button[data-action=abort]").click()
    assert browser.find_element(By.ID, "confirm-title").text == f"Abort {NAME}?"
    browser.find_element(By.ID, "confirm-token").send_keys(TOKEN)
    browser.find_element(By.ID, "confirm-ok").click()
    until(
        browser,
        lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is None,
        "the dialog to close",
    )
    r = store.connect_sync(redis_url)
    entries = r.xrange(keys.commands(NAME))
    assert [e[1][b"command"] for e in entries] == [b"abort"]


def test_a_token_link_opened_in_an_open_tab_unlocks_the_page(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(redis_url, tmp_path)
    open_page(browser, page, "the experiment")
    browser.execute_script("sessionStorage.clear()")
    until(browser, lambda d: (page_data(d).get("pairs") or {}).get("locked"), "a locked page")
    browser.execute_script(f"location.hash = 'token={TOKEN}'")  # the same tab: no reload
    until(browser, lambda d: page_data(d).get("pairs") == [], "the pairs unlocked by the link")
    assert browser.execute_script("return location.hash") == ""


def request(i: int, variant: str, assignment: int, *, error: bool = False) -> TelemetryEvent:
    return TelemetryEvent(
        experiment=NAME,
        variant=variant,
        request_id=f"{variant}-{assignment}-{i}",
        assignment=assignment,
        status=500 if error else 200,
        error=ErrorClass.ERROR_CLASS_UPSTREAM_5XX if error else ErrorClass.ERROR_CLASS_NONE,
        time_unix_ms=int(time.time() * 1000) - 100 * i,
        duration_ms=80.0,
        prompt_tokens=10,
        completion_tokens=5,
    )


def test_a_forced_only_canary_shows_0_assigned_requests_beside_its_model(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    """Testers forced 8 requests to the canary, one in four failing; no user was assigned to
    it: the page says 0 assigned and 8 forced, and compares nothing of the testers'."""
    events = [request(i, "stable", Assignment.ASSIGNMENT_STICKY) for i in range(20)] + [
        request(i, "canary", Assignment.ASSIGNMENT_FORCED, error=i % 4 == 0) for i in range(8)
    ]
    seed(redis_url, tmp_path, checks=[WAITING], events=events)
    open_page(browser, page, "the experiment with tester traffic")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#traffic-table tr"), "traffic")
    shown = browser.execute_script(
        """return Object.fromEntries([...document.querySelectorAll("#traffic-table tbody tr")]
             .map((tr) => [tr.dataset.variant, Object.fromEntries(
               [...tr.querySelectorAll("td[data-field]")].map((td) =>
                 [td.dataset.field, td.textContent]))]));"""
    )
    assert shown["canary"]["assigned"] == "0"
    assert shown["canary"]["forced"] == "8"
    assert shown["canary"]["model"] == "llama-3.1-8b-instruct-ft2"
    assert shown["canary"]["price"] == "0.120 in, 0.240 out per million tokens"
    assert shown["stable"]["assigned"] == "20"
    assert shown["stable"]["model"] == "llama-3.1-8b-instruct"
    # The comparison's canary error rate is of assigned requests: none, so no figure.
    cell = browser.find_element(
        By.CSS_SELECTOR,
        '#comparison-table td[data-variant="canary"][data-metric="error_rate"][data-field="value"]',
    )
    assert cell.text == fig.MISSING
    assert not browser.find_elements(By.ID, "srm")


def test_a_sample_ratio_mismatch_raises_a_banner(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(redis_url, tmp_path, checks=[PASSING], extra={"srm_p": 2.5e-5, "action": "hold"})
    open_page(browser, page, "the experiment with a mismatch")
    banner = until(browser, lambda d: d.find_elements(By.ID, "srm"), "the SRM banner")[0]
    assert banner.is_displayed()
    assert "Sample ratio mismatch" in banner.text
    assert "p = 0.000025 (mismatch below 0.001)" in banner.text


def ladder(browser: WebDriver) -> list[tuple[str, str]]:
    """(share text, state) of every stage as drawn."""
    steps: list[list[str]] = browser.execute_script(
        """return [...document.querySelectorAll("#ladder li.step")].map((li) =>
             [li.querySelector("strong").textContent, li.dataset.state]);"""
    )
    return [(share, st) for share, st in steps]


def test_the_ladder_marks_the_current_stage_and_its_countdown_moves(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(
        redis_url,
        tmp_path,
        stage=2,
        checks=[PASSING],
        extra={"variants": {"stable": {"requests": 900}, "canary": {"requests": 120}}},
    )
    open_page(browser, page, "the running experiment")
    until(browser, lambda d: d.find_elements(By.ID, "countdown"), "the countdown")
    assert ladder(browser) == [
        ("2%", "done"),
        ("5%", "done"),
        ("10%", "current"),
        ("25%", "next"),
        ("50%", "next"),
        ("100%", "next"),
    ]
    assert browser.find_element(By.ID, "stage").text.startswith("stage 3 of 6 (10%), running")
    samples = browser.find_element(By.ID, "samples")
    assert samples.text == "120 of 200 candidate requests"
    first = browser.find_element(By.ID, "countdown").text
    # Started 60 s before the seed, 300 s minimum: about four minutes left, ticking down.
    minutes, secs = (int(x) for x in first.split(":"))
    assert 0 < 60 * minutes + secs <= 240
    until(
        browser,
        lambda d: d.find_element(By.ID, "countdown").text not in ("", first),
        "the countdown to move",
    )
    later = browser.find_element(By.ID, "countdown").text
    assert [int(x) for x in later.split(":")] < [minutes, secs]


def test_after_a_rollback_the_ladder_says_so_and_shows_no_progress(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(
        redis_url,
        tmp_path,
        status="rolled_back",
        stage=2,
        checks=[FAILING],
        weights={"stable": 100, "canary": 0},
    )
    open_page(browser, page, "the rolled-back experiment")
    until(browser, lambda d: ladder(d), "the ladder")
    assert ladder(browser)[2] == ("10%", "rolled back")
    stage = browser.find_element(By.ID, "stage").text
    assert stage.startswith("rolled back in stage 3 of 6 (10%): all traffic on stable")
    assert not browser.find_elements(By.ID, "countdown")


@pytest.fixture(scope="module")
def phone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Chromium with a viewport 420 px wide, a phone held upright (emulated: a headless
    window is at least 500 px wide)."""
    require_browser()
    driver = catching(chrome(tmp_path_factory.mktemp("chromium-phone")))
    metrics = {"width": 420, "height": 900, "deviceScaleFactor": 1, "mobile": True}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        yield driver
    finally:
        driver.quit()


def test_no_sideways_scroll_at_420_px(
    redis_url: str, page: str, phone: WebDriver, tmp_path: Path
) -> None:
    events = [request(i, "stable", Assignment.ASSIGNMENT_STICKY) for i in range(20)] + [
        request(i, "canary", Assignment.ASSIGNMENT_STICKY, error=i == 0) for i in range(8)
    ]
    seed(
        redis_url,
        tmp_path,
        checks=[FAILING, WAITING, PASSING],
        events=events,
        extra={"srm_p": 1e-5},
    )
    open_page(phone, page, "the experiment on a phone")
    until(phone, lambda d: d.find_elements(By.CSS_SELECTOR, "#checks-table tr.verdict"), "rows")
    until(phone, lambda d: d.find_elements(By.CSS_SELECTOR, "figure.chart"), "charts")
    widths = phone.execute_script(
        """const doc = document.documentElement;
           return [doc.scrollWidth, doc.clientWidth, window.innerWidth,
                   document.querySelector("#checks-table").parentElement.scrollWidth,
                   document.querySelector("#checks-table").parentElement.clientWidth];"""
    )
    page_width, viewport, inner, table_width, card_width = widths
    assert inner == 420
    assert page_width <= viewport, widths
    assert table_width > card_width  # the wide table scrolls inside its card instead


def test_charts_have_axis_titles_the_limit_at_the_margin_and_labelled_decisions(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    """Stable's p99 is 80 ms and the guardrail tolerates +50%: the p99 chart draws its limit at
    120 ms; the error rate's ceiling of 2% is drawn on the error-rate chart; the hold an
    evaluator recorded is a line labelled "hold", with its kind in the legend."""
    events = [request(i, "stable", Assignment.ASSIGNMENT_STICKY) for i in range(20)] + [
        request(i, "canary", Assignment.ASSIGNMENT_STICKY) for i in range(8)
    ]
    hold = {
        "time": time.time() - 0.5,
        "action": "hold",
        "actor": "evaluator",
        "reasons": ["canary: latency_p99 worse beyond the margin"],
        "stage": 2,
        "status": "running",
        "weights": {"stable": 90, "canary": 10},
    }
    guardrails = [
        {"metric": "latency_p99", "max_increase": 0.5, "action": "rollback"},
        {"metric": "error_rate", "max_increase": 0.5, "max_absolute": 0.02, "action": "hold"},
    ]
    seed(redis_url, tmp_path, checks=[PASSING], events=events, audit=[hold], guardrails=guardrails)
    open_page(browser, page, "the experiment with decisions")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "figure.chart"), "charts")
    drawn = browser.execute_script(
        """const out = {};
           for (const f of document.querySelectorAll("figure.chart")) {
             out[f.dataset.metric] = {
               titles: [...f.querySelectorAll("text.axis-title")].map((t) => t.textContent),
               limits: [...f.querySelectorAll("line.limit")].map((l) =>
                 [l.classList[1], JSON.parse(l.dataset.value), l.textContent]),
               decisions: [...f.querySelectorAll("text.marker-label")].map((t) =>
                 t.firstChild.textContent),
             };
           }
           out.legend = [...document.querySelectorAll("#legend [data-decision]")].map(
             (k) => k.dataset.decision);
           return out;"""
    )
    p99 = drawn["latency_ms.p99"]
    assert p99["titles"][0] == "ms"
    assert p99["titles"][1].startswith("time of day")
    # Stable's p99 (80 ms, within the sketch's 2%) plus the 50% margin.
    stable_p99 = page_data(browser)["experiment"]["variants"]["stable"]["latency_ms"]["p99"]
    assert stable_p99 == pytest.approx(80.0, rel=0.02)
    limit = stable_p99 * (1 + 0.5)
    text = fig.value_text("latency_ms.p99", limit)
    assert p99["limits"] == [
        ["margin", limit, f"p99 latency limit {text} (stable +50.0%, rollback)"]
    ]
    assert drawn["error_rate"]["titles"][0] == "%"
    assert ["ceiling", 0.02, "error rate ceiling 2.00% (hold)"] in drawn["error_rate"]["limits"]
    assert p99["decisions"] == ["hold"]
    assert drawn["legend"] == ["hold"]


def test_the_range_control_sizes_the_buckets_to_the_range(
    redis_url: str, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    seed(
        redis_url,
        tmp_path,
        events=[request(i, "stable", Assignment.ASSIGNMENT_STICKY) for i in range(5)],
    )
    open_page(browser, page, "the experiment")
    until(browser, lambda d: page_data(d).get("series"), "the series")
    # A minute of events: 10 s steps, the rollups' finest.
    assert page_data(browser)["series"]["step_s"] == 10
    Select(browser.find_element(By.ID, "range")).select_by_value("3600")
    until(browser, lambda d: page_data(d)["series"]["span_s"] == 3600, "the hour's series")
    series = page_data(browser)["series"]
    assert series["step_s"] == 60
    assert len(series["t"]) <= 61
    caption = browser.find_element(By.CSS_SELECTOR, 'figure[data-metric="window_requests"]')
    assert "requests per 60 s" in caption.text
