"""Commands come from the network and are not trusted: garbage is refused in one sentence, always.

Property tests feed `parse_command` random bytes, huge payloads, nested JSON of every type,
unknown command names and unicode; one test feeds a running station a burst of such garbage
over a real broker and checks that it answers each on P/error and keeps inspecting.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, Subscriber, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from edge.mqtt import COMMANDS
from edge.station import Station, parse_command

LIMIT = 4096  # bytes, README "MQTT topics"
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
# Unicode that may stand in an MQTT topic level: no wildcards, no separator, and none of the
# control characters, surrogates or non-characters that Mosquitto refuses in a topic.
TOPIC_CHARS = st.characters(exclude_categories=("Cc", "Cs", "Cn"), exclude_characters="+#/")
# JSON keys that are echoed in error messages: no line breaks and short, because a hostile key
# still breaks the one-line rule (test_error_messages_stay_one_line_whatever_the_keys).
KEY_CHARS = st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters="\x85")

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats()  # NaN and infinities too: json.dumps writes them, json.loads reads them
    | st.text()
)
keys = st.sampled_from(["part_id", "token", "Part_ID", "", "part_id "]) | st.text(
    KEY_CHARS, max_size=20
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)
command_like = st.dictionaries(keys, json_values, max_size=4) | st.fixed_dictionaries(
    {},
    optional={
        "part_id": json_values | st.text(PRINTABLE, max_size=140) | st.text(max_size=140),
        "token": json_values | st.text(max_size=300),
    },
)


def _dump(doc: Any, ensure_ascii: bool, indent: int | None) -> bytes:
    return json.dumps(doc, ensure_ascii=ensure_ascii, indent=indent).encode()


json_payloads = st.builds(
    _dump, json_values | command_like, st.booleans(), st.none() | st.integers(0, 3)
)
payloads = st.one_of(
    st.binary(max_size=LIMIT + 100),
    st.text(max_size=300).map(str.encode),
    json_payloads,
    # Other encodings of a JSON object: UTF-16/32 and a UTF-8 byte-order mark.
    st.builds(
        lambda doc, enc: json.dumps(doc).encode(enc),
        command_like,
        st.sampled_from(["utf-16", "utf-32", "utf-8-sig"]),
    ),
    # Around the size limit, and far beyond it.
    st.builds(
        lambda n: json.dumps({"part_id": "A", "token": "x" * n}).encode(),
        st.integers(LIMIT - 40, LIMIT + 10),
    ),
    st.builds(lambda chunk, n: chunk * n, st.binary(min_size=1, max_size=8), st.integers(1, 10**6)),
    # Nested deeper than the JSON parser's recursion limit, and almost as deep.
    st.builds(
        lambda opening, closing, n: opening * n + b"0" + closing * n,
        st.sampled_from([b"[", b'{"a":', b'{"part_id":[']),
        st.sampled_from([b"", b"]", b"}"]),
        st.integers(500, LIMIT),
    ),
)
names = st.sampled_from(COMMANDS) | st.text(max_size=80)
tokens = st.none() | st.text(min_size=1, max_size=20)


def assert_one_sentence(message: str) -> None:
    """One line, and bounded: what it quotes from the message is cut short and escaped.

    (64 characters of a command name, each escaped as \\U000e0fff at worst, come to 700.)
    """
    assert message.strip(), "empty error message"
    assert len(message.splitlines()) == 1, f"more than one line: {message!r}"
    assert len(message) <= 1000, f"{len(message)} characters: {message[:100]!r}..."


@settings(max_examples=400, deadline=None)
@given(name=names, payload=payloads, token=tokens)
def test_a_command_is_parsed_or_refused_in_one_sentence(
    name: str, payload: bytes, token: str | None
) -> None:
    try:
        cmd = parse_command(name, payload, token)
    except ValueError as exc:
        assert_one_sentence(str(exc))
        if name not in COMMANDS:
            assert "unknown command" in str(exc)
        return
    assert name in COMMANDS and len(payload) <= LIMIT
    assert isinstance(cmd, BaseModel)
    if token is not None:
        assert cmd.token == token, "only the configured token lets a command through"
    if name == "trigger":
        part_id = cmd.part_id  # type: ignore[attr-defined]
        assert part_id is None or (
            1 <= len(part_id) <= 128 and all(" " <= c <= "~" for c in part_id)
        )
    else:
        assert cmd.model_fields_set <= {"token"}


@settings(max_examples=200, deadline=None)
@given(
    part_id=st.text(PRINTABLE, min_size=1, max_size=128),
    token=tokens,
    ensure_ascii=st.booleans(),
    indent=st.none() | st.integers(0, 4),
)
def test_a_trigger_with_a_printable_part_id_always_passes(
    part_id: str, token: str | None, ensure_ascii: bool, indent: int | None
) -> None:
    doc = {"part_id": part_id} if token is None else {"token": token, "part_id": part_id}
    cmd = parse_command("trigger", _dump(doc, ensure_ascii, indent), token)
    assert cmd.part_id == part_id  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("payload", [b"", b"  \n", b"{}", b'{"token": null}'])
def test_an_empty_command_passes_without_a_token(name: str, payload: bytes) -> None:
    assert parse_command(name, payload, None).model_fields_set <= {"token"}


@pytest.mark.parametrize(
    "payload",
    [b"[" * LIMIT, b"[" * 1100 + b"]" * 1100, b'{"part_id": ' + b"[" * 2000],
    ids=["unclosed", "closed", "in-a-value"],
)
def test_deep_nesting_is_refused_with_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError) as refused:
        parse_command("trigger", payload, "a-token")
    assert_one_sentence(str(refused.value))


# --- gaps found here; each marker goes when its product change lands ---


@pytest.mark.parametrize(
    "key", ["a\nWARNING forged log line", "a\u2028b", "k" * 3000], ids=["newline", "u2028", "long"]
)
def test_error_messages_stay_one_line_whatever_the_keys(key: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_command("pause", json.dumps({key: 1}).encode(), None)
    assert_one_sentence(str(refused.value))


# --- a running station fed garbage over a real broker ---


@pytest.fixture
def triggered(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    broker: Broker,
    subscribe: Callable[[str], Subscriber],
    run_station: Callable[[Path], Station],
) -> tuple[Station, Subscriber]:
    """A triggered station under prefix `fuzz`, online, and a subscriber to all of it."""
    sub = subscribe("fuzz/#")
    config = write_config(
        tmp_path, parts_model, replay, broker, "fuzz", trigger={"mode": "triggered"}
    )
    station = run_station(config)
    sub.wait_for("status", lambda m: m.payload == b"online", timeout=10)
    return station, sub


def _refused(name: str, payload: bytes) -> bool:
    try:
        parse_command(name, payload, None)
    except ValueError:
        return True
    return False


def test_a_station_fed_garbage_answers_each_and_keeps_inspecting(
    triggered: tuple[Station, Subscriber],
) -> None:
    station, sub = triggered
    sent: list[str] = []

    # Hypothesis draws the garbage (derandomized: the same draws every run); only the
    # messages the station must refuse are sent, so none may pause it or reload its model.
    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        name=st.sampled_from(COMMANDS) | st.text(TOPIC_CHARS, max_size=40),
        payload=payloads.filter(lambda p: len(p) <= 20_000),
    )
    def publish_garbage(name: str, payload: bytes) -> None:
        if _refused(name, payload):
            sub.publish(f"fuzz/cmd/{name}", payload)
            sent.append(name)

    publish_garbage()
    assert len(sent) >= 50, "hypothesis drew too little garbage to be a test"
    deadline = time.monotonic() + 10
    while len(sub.on("error")) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    answers = [m.json() for m in sub.on("error")]
    assert Counter(a["command"] for a in answers) == Counter(sent), "one answer per message"
    for answer in answers:
        assert_one_sentence(answer["error"])
    assert sub.on("verdict") == [] and not station.paused and station.status == "online"

    sub.publish("fuzz/cmd/trigger", json.dumps({"part_id": "after-the-garbage"}))
    verdict = sub.wait_for("verdict", timeout=10).json()
    assert verdict["part_id"] == "after-the-garbage" and verdict["verdict"] in ("ok", "ng")
    assert {m.payload for m in sub.on("status")} == {b"online"}, "never paused, never offline"
    assert station.status == "online" and not station.paused
