"""docs/dashboard.png: the dashboard after the demo's rollout (a regression rolled back at 25%).

Runs `extproc demo`'s stack and traffic on free ports, with every request mirrored to the canary
and a fifth of them captured (so the pair browser has both sides), then photographs the whole
page in headless Chromium (the browser tests' driver). About a minute and a half:

    .venv/bin/python bench/dashboard_screenshot.py [-o docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import yaml

from extproc.config import load_experiment
from extproc.dev import demo, stack
from extproc.dev.demo import DEMO_EXPERIMENT, DEMO_MODELS
from tests.integration.test_dashboard_browser import WAIT_S, chrome, require_browser

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--width", type=int, default=1400)
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
            end = asyncio.run(
                demo.rollout(
                    ep["listener"], ep["redis"], exp.name, ep["models"]["canary"], "regression", 300
                )
            )
            print(f"rollout ended: {end}")
            shoot(str(stack.dashboard_url(state)), Path(tmp) / "chromium", args)
        finally:
            stack.down(opts.state_dir)


def shoot(url: str, profile: Path, args: argparse.Namespace) -> None:
    driver = chrome(profile, args.width, 1000)
    try:
        driver.get(url)
        stack.wait_until(
            lambda: driver.execute_script("return window.extproc.series !== null"),
            "the dashboard's first drawing",
            WAIT_S,
        )
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(args.width, height)
        driver.save_screenshot(str(args.output))
        print(f"wrote {args.output} ({args.width}x{height})")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
