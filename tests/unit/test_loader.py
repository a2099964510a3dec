"""Tests for passguard.loader: strict, bounded YAML/JSON loading."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passguard import loader_yaml as loader_module
from passguard.errors import InputError
from passguard.loader import MAX_NUMBER_CHARS, Limits, load_documents
from tests.kuma_fixtures import cross_check, kuma, own

#: Every hostile input must be refused within this many seconds.
TIME_BOUND = 3.0

C_LOADER: type[Any] | None = getattr(yaml, "CSafeLoader", None)
YAML_LOADERS = [
    pytest.param(yaml.SafeLoader, id="python-parser"),
    pytest.param(
        C_LOADER,
        id="libyaml-parser",
        marks=pytest.mark.skipif(C_LOADER is None, reason="PyYAML without libyaml"),
    ),
]


@pytest.fixture(params=YAML_LOADERS)
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type[Any]:
    """Run the test once with each YAML parser: the checks must not depend on it."""
    cls: type[Any] = request.param
    monkeypatch.setattr(loader_module, "_YAML_LOADER", cls)
    return cls


def fixture(relative: str) -> bytes:
    """The project's own Kuma-format test data (tests/data/kuma)."""
    return own(relative).read_bytes()


DEFAULT_LIMITS = Limits()


def refused(
    body: bytes, match: str, content_type: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> str:
    """Assert that ``body`` is refused with InputError matching ``match``, quickly."""
    start = time.perf_counter()
    with pytest.raises(InputError, match=match) as info:
        load_documents(body, content_type, limits)
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_BOUND, f"took {elapsed:.2f}s to refuse"
    return str(info.value)


# --------------------------------------------------------------------------
# good input


@pytest.mark.usefixtures("yaml_loader")
class TestGoodYAML:
    def test_kubernetes_mesh(self) -> None:
        docs = load_documents(fixture("mesh/mesh-passthrough-false.k8s.yaml"))
        assert docs == [
            {
                "apiVersion": "kuma.io/v1alpha1",
                "kind": "Mesh",
                "metadata": {"name": "payments"},
                "spec": {"networking": {"outbound": {"passthrough": False}}},
            }
        ]

    def test_universal_mesh(self) -> None:
        docs = load_documents(fixture("mesh/mesh-passthrough-false.universal.yaml"))
        assert docs == [
            {"type": "Mesh", "name": "payments", "networking": {"outbound": {"passthrough": False}}}
        ]

    def test_meshpassthrough_documents(self) -> None:
        allow = load_documents(
            fixture("meshpassthrough/allow-some.universal.yaml")
        )
        assert allow[0]["type"] == "MeshPassthrough"
        matches = allow[0]["spec"]["default"]["appendMatch"]
        assert matches[0] == {
            "type": "Domain",
            "value": "api.stripe.example",
            "protocol": "tls",
            "port": 443,
        }
        assert matches[3]["value"] == "*.storage.example"
        disable = load_documents(
            fixture("meshpassthrough/disable.universal.yaml")
        )
        assert disable[0]["spec"]["default"] == {"passthroughMode": "None"}

    def test_multi_document_body_of_files(self) -> None:
        names = [
            "mesh/mesh-passthrough-false.k8s.yaml",
            "mesh/mesh-passthrough-false.universal.yaml",
            "meshpassthrough/allow-some.universal.yaml",
            "meshpassthrough/disable.universal.yaml",
        ]
        body = b"---\n".join(fixture(name) for name in names) + b"---\n"
        docs = load_documents(body, "application/yaml")
        assert [doc.get("kind", doc.get("type")) for doc in docs] == [
            "Mesh",
            "Mesh",
            "MeshPassthrough",
            "MeshPassthrough",
        ]

    @pytest.mark.parametrize(
        "path",
        [
            pytest.param(lambda: own("crds/meshes.crd.yaml"), id="own-meshes-crd"),
            pytest.param(lambda: own("crds/meshpassthroughs.crd.yaml"), id="own-mp-crd"),
            pytest.param(lambda: own("meshpassthrough/spec.yaml"), id="own-spec"),
            *[
                pytest.param(lambda name=name: kuma(name), id=f"kuma-{name}", marks=cross_check)
                for name in [
                    "mesh/v2.14.3-kuma.io_meshes.crd.yaml",
                    "mesh/v2.14.3-kuma.io_meshpassthroughs.crd.yaml",
                    "mesh/v2.14.3-mesh.rest.yaml",
                    "meshpassthrough/v2.14.3-valid.spec.input.yaml",
                    "mesh/website-mesh-passthrough-false.k8s.yaml",
                    "meshpassthrough/website-allow-some-passthrough.universal.yaml",
                ]
            ],
        ],
    )
    def test_files_agree_with_pyyaml(self, path: Callable[[], Path]) -> None:
        body = path().read_bytes()
        expected = [doc for doc in yaml.safe_load_all(body) if doc is not None]
        assert load_documents(body) == expected

    def test_timestamps_stay_strings(self) -> None:
        body = (
            b"metadata:\n"
            b"  creationTimestamp: 2024-05-01T12:34:56Z\n"
            b"  date: 2024-05-01\n"
            b"  spaced: 2001-12-14 21:59:43.10 -5\n"
            b"  tagged: !!timestamp 2024-05-01T12:34:56Z\n"
        )
        assert load_documents(body) == [
            {
                "metadata": {
                    "creationTimestamp": "2024-05-01T12:34:56Z",
                    "date": "2024-05-01",
                    "spaced": "2001-12-14 21:59:43.10 -5",
                    "tagged": "2024-05-01T12:34:56Z",
                }
            }
        ]

    def test_yaml_1_1_scalars(self) -> None:
        body = (
            b"a: yes\nb: Off\nc: on\nd: NO\ne: y\nf: n\n"
            b"g: 0755\nh: 0x1F\ni: 0b101\nj: 1_000\nk: 1:30\n"
            b"l: 1.5\nm: 1.0e+3\nn: 1e5\no: ~\np: null\nq: ''\nr: '123'\n"
            b"s: !!str 12\nt: !!float 2\nu: ! 12\nv: .5\nw: '<<'\n"
        )
        assert load_documents(body) == [
            {
                "a": True,
                "b": False,
                "c": True,
                "d": False,
                "e": "y",
                "f": "n",
                "g": 0o755,
                "h": 31,
                "i": 5,
                "j": 1000,
                "k": "1:30",  # sexagesimal stays a string
                "l": 1.5,
                "m": 1000.0,
                "n": "1e5",  # YAML 1.1 floats need a dot, as in PyYAML
                "o": None,
                "p": None,
                "q": "",
                "r": "123",
                "s": "12",
                "t": 2.0,
                "u": "12",  # the non-specific tag "!" means string
                "v": 0.5,
                "w": "<<",
            }
        ]

    def test_scalar_keys(self) -> None:
        assert load_documents(b"2: a\non: b\n~: c\n1.5: d\n") == [
            {2: "a", True: "b", None: "c", 1.5: "d"}
        ]

    def test_merge_keys(self) -> None:
        body = (
            b"base: &base {a: 1, b: 2}\n"
            b"other: &other {b: 20, c: 30}\n"
            b"one:\n  <<: *base\n  b: 3\n"
            b"list:\n  <<: [*base, *other]\n  d: 4\n"
            b"quoted:\n  '<<': not a merge\n"
        )
        [doc] = load_documents(body)
        assert doc["one"] == {"a": 1, "b": 3}
        assert doc["list"] == {"a": 1, "b": 2, "c": 30, "d": 4}
        assert doc["quoted"] == {"<<": "not a merge"}

    def test_aliases_are_copied(self) -> None:
        [doc] = load_documents(b"a: &x {k: [1, 2]}\nb: *x\n")
        assert doc == {"a": {"k": [1, 2]}, "b": {"k": [1, 2]}}
        assert doc["a"] is not doc["b"]
        assert doc["a"]["k"] is not doc["b"]["k"]

    def test_null_documents_are_dropped(self) -> None:
        assert load_documents(b"---\n---\na: 1\n---\n~\n---\n") == [{"a": 1}]

    def test_bom_and_unicode(self) -> None:
        assert load_documents("\ufeffname: café ✓\n".encode()) == [{"name": "café ✓"}]

    def test_flow_yaml_starting_with_brace(self) -> None:
        assert load_documents(b"{a: 1, b: [x, y]}") == [{"a": 1, "b": ["x", "y"]}]

    def test_json_looking_multi_document_falls_back_to_yaml(self) -> None:
        assert load_documents(b'{"a": 1}\n---\n{"b": 2}\n') == [{"a": 1}, {"b": 2}]

    def test_limits_are_inclusive(self) -> None:
        limits = Limits(max_documents=3, max_depth=3, max_nodes=7, max_scalar_bytes=3)
        assert load_documents(b"a\n---\nb\n---\nc\n", limits=limits) == ["a", "b", "c"]
        assert load_documents(b"[[[abc]]]", "application/yaml", limits) == [[[["abc"]]]]
        assert load_documents(b"{a: 1, b: 2, c: 3}", "text/yaml", limits) == [
            {"a": 1, "b": 2, "c": 3}
        ]
        assert load_documents("é".encode(), limits=limits) == ["é"]


class TestGoodJSON:
    def test_object(self) -> None:
        assert load_documents(b' {"a": [1, 2.5, true, null, "x"]} ') == [
            {"a": [1, 2.5, True, None, "x"]}
        ]

    def test_admission_review_style(self) -> None:
        mesh = json.loads(
            json.dumps(yaml.safe_load(fixture("mesh/mesh-passthrough-false.k8s.yaml")))
        )
        old = {**mesh, "spec": {"networking": {"outbound": {"passthrough": True}}}}
        mesh["metadata"]["creationTimestamp"] = "2024-05-01T12:34:56Z"
        body = json.dumps({"object": mesh, "oldObject": old}).encode()
        [doc] = load_documents(body, "application/json; charset=utf-8")
        assert doc["object"]["spec"]["networking"]["outbound"]["passthrough"] is False
        assert doc["oldObject"]["spec"]["networking"]["outbound"]["passthrough"] is True
        assert doc["object"]["metadata"]["creationTimestamp"] == "2024-05-01T12:34:56Z"

    def test_array_is_one_document(self) -> None:
        assert load_documents(b"[1, 2]", "application/json") == [[1, 2]]

    def test_scalar_document_with_json_content_type(self) -> None:
        assert load_documents(b'"text"', "application/json") == ["text"]
        assert load_documents(b"1e+20", "application/json") == [1e20]

    def test_plus_json_content_type(self) -> None:
        assert load_documents(b'{"a": 1}', "application/merge-patch+json") == [{"a": 1}]

    def test_big_integers_within_limit(self) -> None:
        big = "9" * MAX_NUMBER_CHARS
        assert load_documents(f"[{big}]".encode()) == [[int(big)]]

    def test_json_body_with_yaml_content_type(self) -> None:
        assert load_documents(b'{"a": [1]}', "application/yaml") == [{"a": [1]}]

    def test_utf8_bom(self) -> None:
        assert load_documents(b'\xef\xbb\xbf{"a": 1}', "application/json") == [{"a": 1}]


# --------------------------------------------------------------------------
# hostile input


def billion_laughs(levels: int = 9) -> bytes:
    lines = [b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        name, previous = chr(ord("a") + level), chr(ord("a") + level - 1)
        refs = ", ".join([f"*{previous}"] * 9)
        lines.append(f"{name}: &{name} [{refs}]".encode())
    return b"\n".join(lines) + b"\n"


@pytest.mark.usefixtures("yaml_loader")
class TestHostileYAML:
    def test_billion_laughs(self) -> None:
        message = refused(billion_laughs(), r"more than 100000 nodes after alias expansion")
        assert "(max_nodes)" in message
        assert "line 6" in message

    def test_wide_alias_amplification(self) -> None:
        items = ",".join(["x"] * 1000)
        body = f"a: &a [{items}]\n".encode() + b"".join(f"k{i}: *a\n".encode() for i in range(200))
        refused(body, r"more than 100000 nodes after alias expansion \(max_nodes\)")

    def test_alias_depth_amplification(self) -> None:
        body = b"a: &a " + b"[" * 40 + b"]" * 40 + b"\nb: " + b"[" * 30 + b"*a" + b"]" * 30
        refused(body, r"nests deeper than 64 levels \(max_depth\) at line 2 column 34")

    @pytest.mark.parametrize("content_type", [None, "application/yaml"])
    def test_deep_flow_nesting(self, content_type: str | None) -> None:
        # libyaml may hit its own 1000-level limit while looking ahead: same message
        pattern = r"^body nests deeper than 64 levels \(max_depth\) at line 1 column \d+$"
        refused(b"[" * 10_000, pattern, content_type)
        refused(b"{a: " * 10_000, pattern, content_type)
        refused(b"[" * 65, pattern.replace(r"\d+", "65"), content_type)

    def test_deep_block_nesting(self) -> None:
        body = b"".join(b"  " * i + b"k:\n" for i in range(10_000))
        refused(body, r"nests deeper than 64 levels \(max_depth\) at line 65")

    def test_too_many_documents(self) -> None:
        message = refused(b"---\na: 1\n" * 10_000, r"more than 1000 documents in body")
        assert "(max_documents)" in message

    def test_too_many_empty_documents(self) -> None:
        refused(b"---\n" * 10_000, r"more than 1000 documents in body \(max_documents\)")

    def test_huge_scalar(self, yaml_loader: type[Any]) -> None:
        # The pure-Python scanner needs seconds for 10 MB; 2 MB makes the point.
        size = 10_000_000 if yaml_loader is C_LOADER else 2_000_000
        message = refused(b"key: " + b"x" * size, r"larger than 262144 bytes")
        assert "(max_scalar_bytes)" in message
        assert "line 1 column 6" in message

    def test_huge_multibyte_scalar_counts_bytes(self) -> None:
        limits = Limits(max_scalar_bytes=10)
        refused("a: ééééééé".encode(), r"scalar of 14 bytes .* larger than 10 bytes", limits=limits)

    def test_huge_key(self) -> None:
        refused(b"k" * 300_000 + b": 1\n", r"larger than 262144 bytes \(max_scalar_bytes\)")

    def test_duplicate_keys(self) -> None:
        refused(
            b"metadata:\n  name: a\n  labels: {}\n  name: b\n",
            r"duplicate key 'name' at line 4 column 3 \(first at line 2\)",
        )

    def test_keys_equal_as_values_are_duplicates(self) -> None:
        refused(b"1: a\n1.0: b\n", r"duplicate key 1")

    def test_duplicate_merge_keys(self) -> None:
        refused(b"a: &a {x: 1}\nb:\n  <<: *a\n  <<: *a\n", r"duplicate merge key '<<' at line 4")

    def test_bad_merge_value(self) -> None:
        refused(b"a:\n  <<: [1, 2]\n", r"merge key '<<' needs a mapping or a list of mappings")

    @pytest.mark.parametrize(
        ("body", "tag"),
        [
            (b"!!python/object/apply:os.system ['id']", "!!python/object/apply:os.system"),
            (b"a: !!python/object:os.Popen {}\n", "!!python/object:os.Popen"),
            (b"a: !!python/name:os.system\n", "!!python/name:os.system"),
            (b"a: !foo bar\n", "!foo"),
            (b"a: !!binary aGVsbG8=\n", "!!binary"),
            (b"a: !!set {x}\n", "!!set"),
            (b"- !!omap [a: 1]\n", "!!omap"),
            (b"a: !<tag:example.com,2000:thing> 1\n", "tag:example.com,2000:thing"),
            (b"%TAG !! tag:evil.example.com:\n---\na: !!str x\n", "tag:evil.example.com:str"),
        ],
    )
    def test_unsupported_tags(self, body: bytes, tag: str) -> None:
        message = refused(body, r"unsupported YAML tag")
        assert repr(tag) in message
        assert " at line " in message

    def test_tag_value_mismatch(self) -> None:
        refused(b"a: !!int twelve\n", r"value 'twelve' at line 1 column 4 is not a valid !!int")
        refused(b"a: !!bool maybe\n", r"is not a valid !!bool")
        refused(b"a: !!timestamp soon\n", r"is not a valid !!timestamp")

    @pytest.mark.parametrize("body", [b"? [a]\n: 1\n", b"? {a: 1}\n: 1\n", b"a: &x [1]\n*x : 2\n"])
    def test_unhashable_keys(self, body: bytes) -> None:
        refused(body, r"mapping key at line \d+ column \d+ is a (sequence|mapping); keys must be")

    @pytest.mark.parametrize("literal", [".inf", "-.Inf", ".NaN", "1.0e+999"])
    def test_non_finite_floats(self, literal: str) -> None:
        refused(f"a: {literal}\n".encode(), r"YAML float .* (is not allowed|is out of range)")

    def test_huge_digit_strings(self) -> None:
        refused(b"a: " + b"1" * 100_000, r"number literal of 100000 characters .*longer than 100")
        refused(b"a: 1." + b"5" * 200, r"number literal of 202 characters")
        assert load_documents(b"a: '" + b"1" * 5000 + b"'") == [{"a": "1" * 5000}]

    def test_alias_errors(self) -> None:
        refused(b"a: &a [*a]\n", r"alias \*a refers to itself at line 1 column 8")
        refused(b"a: *nowhere\n", r"alias \*nowhere refers to no anchor at line 1 column 4")
        refused(b"a: &x 1\nb: &x 2\n", r"duplicate anchor &x at line 2 column 4")
        # anchors do not leak from one document into the next
        refused(b"a: &x 1\n---\nb: *x\n", r"alias \*x refers to no anchor at line 3")

    def test_syntax_errors_carry_position(self) -> None:
        message = refused(b"a: 1\n b: [\n", r"invalid YAML: .* at line \d+ column \d+")
        assert "Traceback" not in message
        refused(b"a: 'unterminated\n", r"invalid YAML: .*at line \d+ column \d+")

    def test_control_characters(self) -> None:
        refused(
            "é: ééé\x01".encode(),
            r"invalid YAML: unacceptable character #x0001 .*line 1 column 7",
        )

    def test_no_documents(self) -> None:
        for body in (b"", b"   \n", b"# only a comment\n", b"---\n", b"---\n...\n---\n", b"null\n"):
            refused(body, r"^no documents in body$")


class TestHostileJSON:
    def test_deep_nesting(self) -> None:
        body = b"[" * 10_000 + b"]" * 10_000
        refused(body, r"nests deeper than 64 levels \(max_depth\) at line 1 column 65")
        refused(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, r"max_depth", "application/json")

    def test_deep_nesting_hidden_in_strings_is_fine(self) -> None:
        body = json.dumps({"a": "[" * 10_000 + '\\"{'}).encode()
        assert load_documents(body) == [{"a": "[" * 10_000 + '\\"{'}]

    def test_unterminated_string_scan_is_linear(self) -> None:
        refused(b'["' + b'\\"' * 500_000, r"invalid JSON|invalid YAML", "application/json")
        refused(b'["' + b'\\"' * 500_000, r"invalid YAML")

    def test_duplicate_keys(self) -> None:
        refused(b'{"a": 1, "b": {"c": 1, "c": 2}}', r"duplicate key 'c' in JSON object")

    @pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
    def test_non_finite_constants(self, constant: str) -> None:
        # Not a syntax error, so no fallback to YAML (where NaN would be a string).
        refused(f'{{"a": {constant}}}'.encode(), rf"JSON value {constant} is not allowed")

    def test_overflowing_float(self) -> None:
        refused(b"[1e999]", r"JSON number '1e999' is out of range")

    def test_huge_digit_strings(self) -> None:
        refused(b"[" + b"7" * 100_000 + b"]", r"number literal of 100000 characters in JSON")
        refused(b"[0." + b"7" * 500 + b"]", r"number literal of 502 characters in JSON")

    def test_lone_surrogate(self) -> None:
        refused(b'["\\ud800"]', r"string in JSON contains a lone surrogate")

    def test_too_many_nodes(self) -> None:
        body = json.dumps(list(range(20))).encode()
        refused(body, r"JSON has more than 10 nodes \(max_nodes\)", limits=Limits(max_nodes=10))

    def test_huge_string(self) -> None:
        refused(b'["' + b"x" * 10_000_000 + b'"]', r"larger than 262144 bytes \(max_scalar_bytes\)")

    def test_syntax_error_with_json_content_type(self) -> None:
        refused(b"a: 1\n", r"invalid JSON: Expecting value at line 1 column 1", "application/json")
        refused(b'{"a": 1,}', r"invalid JSON: .* at line 1 column 9", "application/json")

    def test_empty_json(self) -> None:
        refused(b"  \n", r"^no documents in body$", "application/json")
        refused(b"null", r"^no documents in body$", "application/json")


class TestEncoding:
    def test_invalid_utf8(self) -> None:
        refused(b"a: caf\xe9\n", r"^body is not valid UTF-8 at byte 6$")
        refused(b"\xef\xbb\xbfa: \xff", r"^body is not valid UTF-8 at byte 6$")
        refused(b"a: \xed\xa0\x80", r"not valid UTF-8 at byte 3")  # encoded surrogate

    @pytest.mark.parametrize(
        ("codec", "name"),
        [
            ("utf-16", "UTF-16"),
            ("utf-16-be", None),
            ("utf-32", "UTF-32"),
        ],
    )
    def test_utf16_and_utf32(self, codec: str, name: str | None) -> None:
        body = "a: 1\n".encode(codec)
        if codec == "utf-16-be":
            body = b"\xfe\xff" + body
            name = "UTF-16 (big-endian)"
        message = refused(body, r"byte order mark; only UTF-8 is accepted")
        assert name is not None and name in message

    def test_utf16_without_bom(self) -> None:
        refused("a: 1\n".encode("utf-16-le"), r"NUL byte at byte 1; only UTF-8 text is accepted")

    def test_charset_parameter(self) -> None:
        refused(b'{"a": 1}', r"unsupported charset 'latin-1'", "application/json; charset=latin-1")
        assert load_documents(b"a: 1", 'text/yaml; charset="UTF-8"') == [{"a": 1}]


# --------------------------------------------------------------------------
# properties

CONTENT_TYPES = st.sampled_from([None, "application/json", "application/yaml", "text/plain"])

YAMLISH = st.lists(
    st.sampled_from(
        [
            *"{}[]:,-?&*!|>'\"#%@ \n\t\\abxyz019.<=~+_eE",
            *["---", "...", "<<", "!!python/object", "!!str", "!!int", "!!float", "&a", "*a"],
            *["\ufeff", "\x85", "\u2028", "é", "\x00", "\x01", "yes", "null", ".inf", "0x"],
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=200), content_type=CONTENT_TYPES)
def test_arbitrary_bytes_load_or_input_error(body: bytes, content_type: str | None) -> None:
    for cls in (yaml.SafeLoader, C_LOADER):
        if cls is None:
            continue
        _check_only_input_error(body, content_type, cls)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200) | YAMLISH, content_type=CONTENT_TYPES)
def test_arbitrary_text_load_or_input_error(text: str, content_type: str | None) -> None:
    body = text.encode("utf-8", "surrogatepass")
    for cls in (yaml.SafeLoader, C_LOADER):
        if cls is None:
            continue
        _check_only_input_error(body, content_type, cls)


@pytest.fixture(autouse=True)
def _restore_loader() -> Iterator[None]:
    saved = loader_module._YAML_LOADER
    yield
    loader_module._YAML_LOADER = saved


def _check_only_input_error(body: bytes, content_type: str | None, cls: type[Any]) -> None:
    loader_module._YAML_LOADER = cls
    try:
        docs = load_documents(body, content_type)
    except InputError as exc:
        assert str(exc)
        return
    assert isinstance(docs, list) and docs
    assert all(doc is not None for doc in docs)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_DATA = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
JSON_DOCUMENTS = st.lists(JSON_DATA, max_size=5) | st.dictionaries(
    st.text(max_size=10), JSON_DATA, max_size=5
)


def _same(left: Any, right: Any) -> bool:
    """Equality that also tells 1 from 1.0 and True from 1."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(v, right[k]) for k, v in left.items())
    if isinstance(left, list):
        return len(left) == len(right) and all(map(_same, left, right))
    if isinstance(left, float):
        return left == right or (math.isnan(left) and math.isnan(right))
    return bool(left == right)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=JSON_DOCUMENTS)
def test_json_round_trip(data: Any) -> None:
    body = json.dumps(data).encode()
    assert _same(load_documents(body), [data])
    assert _same(load_documents(body, "application/json"), [data])
    assert _same(load_documents(json.dumps(data, ensure_ascii=False).encode("utf-8")), [data])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=JSON_DOCUMENTS, flow=st.booleans())
def test_yaml_round_trip(data: Any, flow: bool) -> None:
    # allow_unicode=False: PyYAML's emitter writes a raw NEL (U+0085) inside
    # single quotes, which its own scanner then folds into a space.
    body = yaml.safe_dump(data, default_flow_style=flow).encode("utf-8")
    for cls in (yaml.SafeLoader, C_LOADER):
        if cls is None:
            continue
        loader_module._YAML_LOADER = cls
        assert _same(load_documents(body, "application/yaml"), [data])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(JSON_DOCUMENTS, min_size=1, max_size=5))
def test_yaml_multi_document_round_trip(docs: list[Any]) -> None:
    body = yaml.safe_dump_all(docs).encode("utf-8")
    assert _same(load_documents(body), docs)
