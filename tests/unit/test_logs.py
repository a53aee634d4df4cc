"""`--log-format json`: one JSON object per record, with the fields a collector indexes."""

from __future__ import annotations

import json
import logging

import pytest

from extproc.cli.main import build_parser
from extproc.logs import JsonFormatter, LogSetup

pytestmark = pytest.mark.timeout(30)


def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc else None
    return logging.LogRecord("extproc.x", logging.WARNING, __file__, 1, msg, ("a",), info)


def test_a_record_is_one_json_object() -> None:
    line = JsonFormatter().format(record("routing %s kept"))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "extproc.x"
    assert doc["message"] == "routing a kept"
    assert doc["time"].endswith("+00:00")
    assert "exception" not in doc


def test_an_exception_travels_in_its_field() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError as err:
        doc = json.loads(JsonFormatter().format(record("failed %s", err)))
    assert "ValueError: bad\nvalue" in doc["exception"]


def test_the_cli_option_picks_the_format() -> None:
    ns = build_parser().parse_args(["--log-format", "json", "check"])
    assert ns.log_format == "json"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        LogSetup(logging.INFO, ns.log_format).apply()
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
