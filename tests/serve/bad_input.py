"""The bad-input corpora's one case shape and one check (classification: test_bad_input.py,
generation: test_generate_bad_input.py): every case gets a 4xx JSON error naming the field
and saying what is wrong."""

from __future__ import annotations

import json
from typing import NamedTuple

import httpx

JSON = {"content-type": "application/json"}


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def raw(text: str) -> bytes:
    return text.encode()


class BadInput(NamedTuple):
    name: str
    path: str
    payload: bytes
    status: int
    field: str  # the error's "field"
    says: str  # a substring of its message (case-insensitive)
    headers: dict[str, str] = JSON


def check_corpus(cases: list[BadInput], at_least: int) -> None:
    assert len(cases) >= at_least, len(cases)
    assert len({c.name for c in cases}) == len(cases), "case names must be unique (they are test ids)"


def check_refused(client: httpx.Client, case: BadInput) -> None:
    r = client.post(case.path, content=case.payload, headers=case.headers)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["field"] == case.field, err
    assert err["message"] and case.says.lower() in err["message"].lower(), err


def send_all(client: httpx.Client, cases: list[BadInput]) -> None:
    for case in cases:
        client.post(case.path, content=case.payload, headers=case.headers)
