"""Captured prompts and answers on the dashboard page need its token; the figures do not.

Headless Chromium against the real stack (`extproc up` with every request captured): opened
without the token the page draws the figures and, in place of the pairs, says that they need the
token; opened with the link `up` prints (``#token=...``) it draws them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from extproc.dev import stack
from tests.component.test_dashboard import NAME, dashboard, dashboard_experiment, send_traffic
from tests.conftest import LiveStack, start_stack
from tests.integration.test_dashboard_browser import chrome, page_data, require_browser, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def captured(tmp_path: Path, http: httpx.Client) -> Iterator[tuple[LiveStack, list[str]]]:
    """A stack with a few captured pairs, and their request ids."""
    require_browser()
    s = start_stack(tmp_path / "stack", dashboard_experiment(tmp_path))
    try:
        send_traffic(s, http, 6, "locked")
        out = s.cli("pairs", NAME, "--json", "--count", "6")
        assert out.returncode == 0, out.stderr
        ids = [p["request_id"] for p in json.loads(out.stdout)]
        assert ids, "capture.sample is 100: every request is captured"
        yield s, ids
    finally:
        stack.down(s.state_dir)


def pair_ids(driver: WebDriver) -> list[str]:
    return [
        a.get_attribute("data-request-id") or ""
        for a in driver.find_elements(By.CSS_SELECTOR, "#pairs article.pair")
    ]


def test_pairs_are_drawn_only_with_the_token(
    captured: tuple[LiveStack, list[str]], tmp_path: Path
) -> None:
    s, ids = captured
    url, token = dashboard(s)
    driver = chrome(tmp_path / "chromium")
    try:
        driver.get(f"{url}/")
        until(driver, lambda d: page_data(d).get("experiment"), "the figures without a token")
        assert page_data(driver)["pairs"] == {"locked": True}
        note = driver.find_element(By.ID, "pairs").text
        assert "need the dashboard's token" in note
        assert pair_ids(driver) == []
        assert not any(rid in driver.page_source for rid in ids)

        driver.get("about:blank")  # a new load: a changed fragment alone does not reload
        driver.get(f"{url}/#token={token}")
        drawn = until(driver, lambda d: pair_ids(d) or None, "the pairs with the token")
        assert ids[0] in drawn
        assert "#token" not in driver.current_url  # the page takes the token out of the URL
    finally:
        driver.quit()
