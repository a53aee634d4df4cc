"""The dashboard's pictures in docs/: a running rollout and the same one rolled back, each wide
(1400 px) and narrow (a 420 px phone, emulated), as the README shows them.

Runs `extproc demo`'s stack and traffic on free ports, with every request mirrored to the canary
and a fifth of them captured (so the pair browser has both sides). Once the rollout has moved past
its first stage it photographs the running page; once the regression at 25% is rolled back, the
page again. Whole pages, in headless Chromium (the browser tests' driver). About two minutes:

    .venv/bin/python bench/dashboard_screenshot.py [-o docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
from pathlib import Path

import redis
import yaml

from extproc.config import load_experiment
from extproc.contract import keys
from extproc.dev import demo, stack
from extproc.dev.demo import DEMO_EXPERIMENT, DEMO_MODELS
from tests.integration.test_dashboard_browser import WAIT_S, chrome, require_browser

ROOT = Path(__file__).resolve().parent.parent
WIDE = 1400
NARROW = 420  # emulated: a headless window is at least 500 px wide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    require_browser()
    with tempfile.TemporaryDirectory() as tmp:
        doc = yaml.safe_load(DEMO_EXPERIMENT.read_text())
        doc["shadow"] = {"variant": "canary", "share": 100}
        doc["capture"] = {"sample": 20}
        path = Path(tmp) / "experiment.yaml"
        path.write_text(yaml.safe_dump(doc))
        exp = load_experiment(path)
        opts = stack.UpOptions(
            experiment=exp,
            experiment_path=path,
            state_dir=Path(tmp) / "stack",
            mock_models=True,
            auto_ports=True,
            mock_args=DEMO_MODELS,
        )
        state = stack.up(opts)
        try:
            ep = state["endpoints"]
            ended: list[str] = []
            traffic = threading.Thread(
                target=lambda: ended.append(
                    asyncio.run(
                        demo.rollout(
                            ep["listener"],
                            ep["redis"],
                            exp.name,
                            ep["models"]["canary"],
                            "regression",
                            300,
                        )
                    )
                )
            )
            traffic.start()
            url, profile = str(stack.dashboard_url(state)), Path(tmp) / "chromium"
            r = redis.Redis.from_url(ep["redis"])
            stack.wait_until(lambda: _stage(r, exp.name) >= 1, "the rollout's second stage", 300)
            shoot(url, profile, args.output / "dashboard-running.png", WIDE)
            shoot(url, profile, args.output / "dashboard-running-narrow.png", NARROW)
            traffic.join()
            print(f"rollout ended: {ended}")
            shoot(url, profile, args.output / "dashboard.png", WIDE)
            shoot(url, profile, args.output / "dashboard-narrow.png", NARROW)
        finally:
            stack.down(opts.state_dir)


def _stage(r: redis.Redis, name: str) -> int:
    raw = r.get(keys.rollout(name))
    return -1 if raw is None else int(json.loads(raw)["stage"])


def shoot(url: str, profile: Path, output: Path, width: int) -> None:
    driver = chrome(profile, max(width, 500), 1000)
    try:
        if width < 500:
            metrics = {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": True}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.get(url)
        stack.wait_until(
            lambda: driver.execute_script("return window.extproc.series !== null"),
            "the dashboard's first drawing",
            WAIT_S,
        )
        height = driver.execute_script("return document.documentElement.scrollHeight")
        if width < 500:
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        else:
            driver.set_window_size(width, height)
        driver.save_screenshot(str(output))
        print(f"wrote {output} ({width}x{height})")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
