"""The request parser: every input yields a valid request or a RequestError naming the field."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetflow.request import MAX_REQUEST_BYTES, RequestError, load_request, parse_request, parse_request_text

VALID = {"request_id": "req-1", "model": "digits-ddpm",
         "target": {"kind": "diffusion-class", "classes": [7]}}


def test_valid_yaml_and_json_are_the_same_request():
    as_yaml = parse_request_text("request_id: req-1\nmodel: digits-ddpm\ntarget: {kind: diffusion-class, classes: [7]}\n")
    as_json = parse_request_text(json.dumps(VALID))
    assert as_yaml == as_json
    assert as_yaml.family == "diffusion" and as_yaml.digest() == as_json.digest()


@pytest.mark.parametrize("mutation, field", [
    ({"request_id": "../../etc/passwd"}, "request_id"),
    ({"model": "a/b"}, "model"),
    ({"target": {"kind": "diffusion-class", "classes": []}}, "target.diffusion-class.classes"),
    ({"target": {"kind": "diffusion-class", "classes": [7, 7]}}, "target.diffusion-class.classes"),
    ({"target": {"kind": "diffusion-class", "classes": [-1]}}, "target.diffusion-class.classes"),
    ({"target": {"kind": "diffusion-class", "classes": [7], "override": {7: 7}}}, "target.diffusion-class"),
    ({"target": {"kind": "diffusion-class", "classes": [7, 8], "override": {7: 8}}}, "target.diffusion-class"),
    ({"target": {"kind": "galaxy"}}, "target"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_fields_are_named(mutation, field):
    with pytest.raises(RequestError) as exc:
        parse_request({**VALID, **mutation})
    assert f"{field}:" in str(exc.value)


@pytest.mark.parametrize("text, fragment", [
    ("request_id: [unclosed", "malformed YAML/JSON at line 1"),
    ("a: &x [1]\nb: *x\n", "anchors"),
    ("- just\n- a list\n", "mapping"),
    (b"\xff\xfe not utf8", "UTF-8"),
])
def test_malformed_documents(text, fragment):
    with pytest.raises(RequestError, match=fragment):
        parse_request_text(text)


def test_huge_and_missing_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("reason: " + "x" * (MAX_REQUEST_BYTES + 1))
    with pytest.raises(RequestError, match="larger than"):
        load_request(big)
    with pytest.raises(RequestError, match="cannot read request file"):
        load_request(tmp_path / "absent.yaml")


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.dictionaries(st.text(max_size=12), st.recursive(
                     st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=10), max_size=6).map(json.dumps)))
def test_any_input_is_a_request_or_a_named_error(text):
    try:
        request = parse_request_text(text)
    except RequestError as exc:
        assert str(exc).startswith(("invalid request", "cannot read"))
    else:
        assert request.request_id and request.model
