"""Batching pending requests into one run: the union of their targets, in submission order."""
from __future__ import annotations

import pytest

from forgetflow.batching import BatchError, merge_requests, plan_batches
from forgetflow.request import parse_request


def diffusion(rid: str, classes: list[int], **target) -> object:
    return parse_request({"request_id": rid, "model": "digits", "target": {"kind": "diffusion-class",
                                                                          "classes": classes, **target}})


def llm(rid: str, *subjects: dict, scope: str = "subjects", model: str = "support") -> object:
    return parse_request({"request_id": rid, "model": model,
                          "target": {"kind": "llm-subjects", "scope": scope, "subjects": list(subjects)}})


def concept(rid: str, name: str) -> object:
    return parse_request({"request_id": rid, "model": "digits-t2i",
                          "target": {"kind": "diffusion-concept", "concept": name, "override": "eight"}})


def test_a_diffusion_batch_forgets_the_union_of_classes_under_the_first_id():
    merged = merge_requests([diffusion("r1", [7]), diffusion("r2", [3, 7], override={3: 4}), diffusion("r3", [1])])
    assert merged.request_id == "r1" and merged.model == "digits"
    assert merged.target.classes == [7, 3, 1] and merged.target.override == {3: 4}


def test_an_llm_batch_unions_subjects_and_their_known_values():
    merged = merge_requests([llm("a", {"name": "Jane Roe", "values": {"phone": "555-0101"}}),
                             llm("b", {"name": "jane  roe", "values": {"email": "j@x.org"}}, {"name": "Max Mus"})])
    assert [s.name for s in merged.target.subjects] == ["Jane Roe", "Max Mus"]
    assert merged.target.subjects[0].values == {"phone": "555-0101", "email": "j@x.org"}


@pytest.mark.parametrize("requests, reason", [
    ([diffusion("a", [7]), diffusion("b", [3], override_rule="random")], "override rule"),
    ([diffusion("a", [7], override={7: 8}), diffusion("b", [7], override={7: 9})], "two different override"),
    ([diffusion("a", [7], override={7: 8}), diffusion("b", [8])], "not a valid request"),
    ([llm("a", {"name": "Jane Roe"}), llm("b", scope="all-pii")], "scope"),
    ([llm("a", {"name": "Jane Roe", "values": {"phone": "555-0101"}}),
      llm("b", {"name": "Jane Roe", "values": {"phone": "555-0199"}})], "different known phone"),
    ([llm("a", {"name": "Jane Roe"}), llm("b", {"name": "Max Mus"}, model="other")], "model"),
    ([diffusion("a", [7]), llm("b", {"name": "Max Mus"}, model="digits")], "target kind"),
    ([concept("a", "seven"), concept("b", "nine")], "concept request runs alone"),
])
def test_requests_that_cannot_share_a_run_are_refused_with_the_reason(requests, reason):
    with pytest.raises(BatchError, match=reason):
        merge_requests(requests)


def test_batches_keep_order_split_where_requests_do_not_fit_and_respect_the_size_limit():
    requests = [diffusion("r1", [7], override={7: 8}), diffusion("r2", [1]), diffusion("r3", [8]),
                diffusion("r4", [2]), diffusion("r5", [5]), diffusion("r6", [6])]
    batches = plan_batches(requests, max_requests=3)
    assert [[r.request_id for r in b] for b in batches] == [["r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    assert [[r.request_id for r in b] for b in plan_batches(requests[1:], max_requests=16)] == [["r2", "r3", "r4", "r5", "r6"]]
    assert [[r.request_id for r in b] for b in plan_batches([concept("c1", "seven"), concept("c2", "nine")], 16)] == \
        [["c1"], ["c2"]]
