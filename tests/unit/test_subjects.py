"""Names -> subjects: no input may reach another tenant's subjects or contain a wildcard."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from arqonbus_server.shared.errors import ArqonError
from arqonbus_server.shared.subjects import (
    NAME_MAX,
    ChannelRef,
    SubjectScheme,
    is_valid_name,
    validate_name,
)

NAME_CHARS = string.ascii_letters + string.digits + "_-"

valid_names = st.text(NAME_CHARS, min_size=1, max_size=NAME_MAX)
# The characters that could break a subject or a tenant boundary, then any character.
DANGEROUS = list(".*> \t\n\x00\x7f\u00a0\u2028é٣")
hostile_chars = st.sampled_from(DANGEROUS) | st.characters()
# A valid name with one hostile character spliced in: the near misses that matter.
near_misses = st.builds(
    lambda head, ch, tail: head + ch + tail,
    st.text(NAME_CHARS, max_size=32),
    hostile_chars,
    st.text(NAME_CHARS, max_size=32),
)
hostile_names = st.one_of(
    valid_names,
    near_misses,
    st.text(hostile_chars, max_size=NAME_MAX + 2),
    st.text(),
)


def replace_one(names: list[str], bad: str, index: int) -> tuple[str, str, str]:
    names[index] = bad
    return names[0], names[1], names[2]


# Two valid names and one hostile one, so a single bad name is never masked by the others.
triples = st.one_of(
    st.builds(
        replace_one, st.lists(valid_names, min_size=3, max_size=3), hostile_names, st.integers(0, 2)
    ),
    st.tuples(hostile_names, hostile_names, hostile_names),
)
schemes = st.builds(SubjectScheme, valid_names)


def oracle_is_valid(value: str) -> bool:
    """The rule stated in the invalid_name message, written out independently."""
    return 1 <= len(value) <= NAME_MAX and all(ch in NAME_CHARS for ch in value)


def assert_safe_subject(subject: str, scheme: SubjectScheme, kind: str, tenant: str) -> None:
    tokens = subject.split(".")
    assert len(tokens) == 5
    assert tokens[0] == scheme.prefix
    assert tokens[1] == kind
    assert tokens[2] == tenant
    for token in tokens:
        assert token
        assert "*" not in token
        assert ">" not in token
        assert not any(ch.isspace() for ch in token)
        assert token.isprintable()


@settings(max_examples=200)
@given(name=hostile_names)
@example(name="a.b")
@example(name="*")
@example(name=">")
@example(name="a b")
@example(name="x" * (NAME_MAX + 1))
def test_a_name_is_accepted_exactly_when_it_follows_the_rule(name: str) -> None:
    try:
        assert validate_name(name, "room") == name
    except ArqonError as exc:
        assert exc.code == "invalid_name"
        assert not oracle_is_valid(name)
    else:
        assert oracle_is_valid(name)


@settings(max_examples=200)
@given(scheme=schemes, names=triples)
@example(scheme=SubjectScheme(), names=("acme", "a.b", "c"))
@example(scheme=SubjectScheme(), names=("acme", "r", ">"))
@example(scheme=SubjectScheme(), names=("acme.other", "r", "c"))
@example(scheme=SubjectScheme(), names=("*", "r", "c"))
def test_no_input_escapes_its_tenant_or_makes_a_wildcard(
    scheme: SubjectScheme, names: tuple[str, str, str]
) -> None:
    tenant, room, channel = names
    try:
        ref = ChannelRef.of(tenant, room, channel)
    except ArqonError as exc:
        assert exc.code == "invalid_name"
        assert not all(oracle_is_valid(v) for v in names)
        return
    ingest, live = scheme.ingest(ref), scheme.live(ref)
    assert_safe_subject(ingest, scheme, "ev", tenant)
    assert_safe_subject(live, scheme, "live", tenant)
    assert ingest.startswith(scheme.tenant_ingest_filter(tenant).removesuffix(">"))
    assert live.startswith(scheme.tenant_live_filter(tenant).removesuffix(">"))


@settings(max_examples=200)
@given(scheme=schemes, tenant=valid_names, other=valid_names, room=valid_names, ch=valid_names)
def test_subject_of_one_tenant_is_outside_every_other_tenant_filter(
    scheme: SubjectScheme, tenant: str, other: str, room: str, ch: str
) -> None:
    assume(tenant != other)
    ref = ChannelRef.of(tenant, room, ch)
    assert not scheme.ingest(ref).startswith(scheme.tenant_ingest_filter(other)[:-1])
    assert not scheme.live(ref).startswith(scheme.tenant_live_filter(other)[:-1])


@pytest.mark.parametrize("bad", [None, 5, b"abc", ["a"], True, 1.5])
def test_non_string_names_are_invalid_name(bad: object) -> None:
    assert not is_valid_name(bad)
    for args in ((bad, "r", "c"), ("t", bad, "c"), ("t", "r", bad)):
        with pytest.raises(ArqonError) as info:
            ChannelRef.of(*args)
        assert info.value.code == "invalid_name"


def test_invalid_name_message_names_the_field() -> None:
    with pytest.raises(ArqonError) as info:
        validate_name("a.b", "channel")
    assert "channel" in info.value.message
    assert "'a.b'" in info.value.message


def test_invalid_name_message_truncates_huge_values() -> None:
    with pytest.raises(ArqonError) as info:
        validate_name("x" * 10_000, "room")
    assert len(info.value.message) < 300


@pytest.mark.parametrize("prefix", ["a.b", "*", ">", "", "a b", "x" * 65])
def test_scheme_rejects_bad_prefix(prefix: str) -> None:
    with pytest.raises(ArqonError) as info:
        SubjectScheme(prefix)
    assert info.value.code == "invalid_name"


def test_default_layout() -> None:
    scheme = SubjectScheme()
    ref = ChannelRef.of("acme", "science", "general")
    assert scheme.ingest(ref) == "arq.ev.acme.science.general"
    assert scheme.live(ref) == "arq.live.acme.science.general"
    assert scheme.tenant_ingest_filter("acme") == "arq.ev.acme.>"
    assert scheme.tenant_live_filter("acme") == "arq.live.acme.>"
    assert scheme.stream_name("acme") == "arq_acme"


@pytest.mark.parametrize("method", ["tenant_ingest_filter", "tenant_live_filter", "stream_name"])
@pytest.mark.parametrize("tenant", ["a.b", "*", ">", "", "a b"])
def test_tenant_level_names_validate_the_tenant(method: str, tenant: str) -> None:
    with pytest.raises(ArqonError) as info:
        getattr(SubjectScheme(), method)(tenant)
    assert info.value.code == "invalid_name"


# -- parse_live -------------------------------------------------------------------


@settings(max_examples=200)
@given(scheme=schemes, tenant=valid_names, room=valid_names, channel=valid_names)
def test_parse_live_round_trips_live(
    scheme: SubjectScheme, tenant: str, room: str, channel: str
) -> None:
    ref = ChannelRef.of(tenant, room, channel)
    assert scheme.parse_live(scheme.live(ref)) == ref


@pytest.mark.parametrize(
    "subject",
    [
        "arq.ev.acme.science.general",  # ingest, not delivery
        "other.live.acme.science.general",  # another prefix
        "arq.live.acme.science",  # too few tokens
        "arq.live.acme.science.general.extra",  # too many tokens
        "arq.live.acme.*.general",
        "arq.live.acme.science.>",
        "arq.live.acme..general",
        "arq.live.acme.science.gen eral",
        "arq.live.acme.science." + "x" * 65,
        "",
        "arq",
    ],
)
def test_parse_live_rejects_foreign_subjects(subject: str) -> None:
    assert SubjectScheme().parse_live(subject) is None


def test_parse_live_rejects_another_schemes_subject() -> None:
    ref = ChannelRef.of("acme", "science", "general")
    assert SubjectScheme("arq").parse_live(SubjectScheme("other").live(ref)) is None


# -- stream names ---------------------------------------------------------------


@settings(max_examples=200)
@given(scheme=schemes, a=valid_names, b=valid_names)
def test_stream_name_is_distinct_for_distinct_tenants(
    scheme: SubjectScheme, a: str, b: str
) -> None:
    assume(a != b)
    assert scheme.stream_name(a) != scheme.stream_name(b)


@settings(max_examples=200)
@given(scheme=schemes, tenant=valid_names)
def test_stream_name_is_a_legal_jetstream_name(scheme: SubjectScheme, tenant: str) -> None:
    name = scheme.stream_name(tenant)
    assert name
    assert not any(ch in name for ch in ".*>/\\") and not any(ch.isspace() for ch in name)


# -- dedupe keys ------------------------------------------------------------------

REF = ChannelRef.of("acme", "science", "general")


@pytest.mark.parametrize(
    ("ref", "principal", "envelope_id"),
    [
        (ChannelRef.of("acme", "other", "general"), "alice", "id-1"),
        (ChannelRef.of("acme", "science", "other"), "alice", "id-1"),
        (REF, "bob", "id-1"),
        (REF, "alice", "id-2"),
    ],
    ids=["room", "channel", "principal", "id"],
)
def test_dedupe_key_differs_when_one_part_differs(
    ref: ChannelRef, principal: str, envelope_id: str
) -> None:
    scheme = SubjectScheme()
    assert scheme.dedupe_key(ref, principal, envelope_id) != scheme.dedupe_key(REF, "alice", "id-1")


def test_dedupe_key_keeps_principal_and_id_apart() -> None:
    # Envelope ids may contain dots; two senders must never share a key, or the
    # second publish is acknowledged as a duplicate and silently not stored.
    scheme = SubjectScheme()
    assert scheme.dedupe_key(REF, "alice.x", "1") != scheme.dedupe_key(REF, "alice", "x.1")


dotted = st.text("ab.", min_size=1, max_size=6)


def dedupe_key_or_none(ref: ChannelRef, principal: str, envelope_id: str) -> str | None:
    try:
        return SubjectScheme().dedupe_key(ref, principal, envelope_id)
    except ArqonError:
        return None  # rejecting a principal is an acceptable way to stay unambiguous


@settings(max_examples=200)
@given(principal=dotted, envelope_id=dotted, data=st.data())
def test_dedupe_key_is_unambiguous_across_senders(
    principal: str, envelope_id: str, data: st.DataObject
) -> None:
    # Re-split "principal.id" at another dot: a different (sender, id) pair that
    # a naive join would map to the same key.
    joined = f"{principal}.{envelope_id}"
    cut = data.draw(st.sampled_from([k for k, ch in enumerate(joined) if ch == "."]))
    other = (joined[:cut], joined[cut + 1 :])
    assume(all(other) and other != (principal, envelope_id))
    first = dedupe_key_or_none(REF, principal, envelope_id)
    second = dedupe_key_or_none(REF, *other)
    assert first is None or first != second
