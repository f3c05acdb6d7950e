"""The event schema: every message survives encode/decode, and bad messages are rejected with
an error that names the offending field."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventlog.schema import (
    Candidate,
    Impression,
    Interaction,
    Label,
    SchemaError,
    UserProfile,
    decode,
    encode,
    to_builtins,
)

# Ids: any text without control characters (those are rejected, see below).
ids = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=12)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
feature_values = st.one_of(
    st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(max_size=8), max_size=4),
)
feature_maps = st.dictionaries(st.text(min_size=1, max_size=8), feature_values, max_size=4)

interactions = st.builds(Interaction, event_id=ids, user_id=ids, item_id=ids, action=ids,
                         ts=times, item_features=feature_maps, context=feature_maps)
candidates = st.builds(Candidate, item_id=ids, item_features=feature_maps)
impressions = st.builds(Impression, request_id=ids, user_id=ids, ts=times,
                        candidates=st.lists(candidates, min_size=1, max_size=4),
                        context=feature_maps)
labels = st.builds(Label, request_id=ids, user_id=ids, item_id=ids,
                   label=st.sampled_from([0, 1]), ts=times)
profiles = st.builds(UserProfile, user_id=ids,
                     features=st.dictionaries(st.text(min_size=1, max_size=8),
                                              st.one_of(st.text(max_size=8), st.integers()),
                                              max_size=4))

INTERACTION = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "action": "click", "ts": 1.5}


def interaction_json(**changes: object) -> bytes:
    """An Interaction message with fields changed (a value of ``...`` drops the field)."""
    fields = {**INTERACTION, **changes}
    return msgspec.json.encode({k: v for k, v in fields.items() if v is not ...})


@given(st.one_of(interactions, impressions, labels, profiles))
def test_every_message_type_round_trips_through_json(message) -> None:
    """decode(encode(m)) == m for every message type, and to_builtins agrees with the JSON."""
    assert decode(type(message), encode(message)) == message
    assert decode(type(message), msgspec.json.encode(to_builtins(message))) == message


def test_integer_feature_values_become_floats() -> None:
    """A JSON integer in a feature map decodes as a numeric (float) value, not as a string."""
    message = decode(Interaction, interaction_json(item_features={"price": 3}))
    assert message.item_features == {"price": 3.0}
    assert isinstance(message.item_features["price"], float)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (interaction_json(ts="yesterday"), "$.ts"),  # wrong type
        (interaction_json(user_id=7), "$.user_id"),  # wrong type
        (interaction_json(ts=...), "`ts`"),  # missing field
        (interaction_json(rating=5), "`rating`"),  # unknown field
        (interaction_json(event_id=""), "event_id"),  # empty id
        (interaction_json(item_id=""), "item_id"),
        (interaction_json(ts=1e999), "$.ts"),  # infinity
        (interaction_json(item_features={"genre": {"a": 1}}), "$.item_features"),
        (interaction_json(context={"": "x"}), "context"),  # empty feature name
    ],
)
def test_bad_interaction_is_rejected_naming_the_field(data: bytes, field: str) -> None:
    """Each malformed Interaction raises SchemaError whose message names the bad field."""
    with pytest.raises(SchemaError, match="Interaction") as error:
        decode(Interaction, data)
    assert field in str(error.value)


@pytest.mark.parametrize(
    ("kind", "data", "field"),
    [
        (Label, b'{"request_id":"r","user_id":"u","item_id":"i","label":3,"ts":1}', "label"),
        (Label, b'{"request_id":"r","user_id":"u","item_id":"i","label":1}', "`ts`"),
        (Impression, b'{"request_id":"r","user_id":"u","ts":1,"candidates":[]}', "candidates"),
        (Impression, b'{"request_id":"r","user_id":"u","ts":1,"candidates":[{"item_id":3}]}',
         "$.candidates[0].item_id"),
        (Impression, b'{"request_id":"","user_id":"u","ts":1,"candidates":[{"item_id":"i"}]}',
         "request_id"),
        (UserProfile, b'{"user_id":""}', "user_id"),
        (UserProfile, b'{"user_id":"u","features":{"age":[1]}}', "$.features"),
        (UserProfile, b'{"user_id":"u","extra":1}', "`extra`"),
    ],
)
def test_bad_message_of_each_type_is_rejected_naming_the_field(kind, data, field) -> None:
    """Label, Impression and UserProfile errors name the offending field too."""
    with pytest.raises(SchemaError) as error:
        decode(kind, data)
    assert field in str(error.value)


def test_nan_is_rejected() -> None:
    """NaN never enters an event: built directly the error names the field; in JSON, NaN is
    not valid syntax, so the decoder rejects the message as malformed."""
    with pytest.raises(ValueError, match="ts must be a finite number"):
        Interaction("e", "u", "i", "click", math.nan)
    with pytest.raises(ValueError, match=r"item_features\['price'\] must be a finite"):
        Interaction("e", "u", "i", "click", 1.0, item_features={"price": math.nan})
    with pytest.raises(SchemaError, match="malformed"):
        decode(Interaction, interaction_json(ts=1.0).replace(b"1.0", b"NaN"))


@pytest.mark.parametrize("user_id", ["a\x00b", "\x00", "tab\there", "del\x7f"])
def test_ids_with_control_characters_are_rejected_naming_the_field(user_id: str) -> None:
    """A user id the store cannot key (NUL) or any control character is a schema error."""
    with pytest.raises(SchemaError, match="user_id must not contain control characters"):
        decode(Interaction, interaction_json(user_id=user_id))


@pytest.mark.parametrize("ts", [-1.0, -1e300, 4_102_444_801.0, 1e300])
def test_event_times_outside_1970_to_2100_are_rejected(ts: float) -> None:
    """An event time outside [1970, 2100] is rejected: it is not an event time."""
    for kind, message in ((Interaction, INTERACTION),
                          (Label, {"request_id": "r", "user_id": "u", "item_id": "i",
                                   "label": 1, "ts": 0.0}),
                          (Impression, {"request_id": "r", "user_id": "u", "ts": 0.0,
                                        "candidates": [{"item_id": "i"}]})):
        with pytest.raises(SchemaError, match="ts must be seconds since the epoch"):
            decode(kind, msgspec.json.encode({**message, "ts": ts}))
