"""Hypothesis strategies for what arrives at an input boundary: wrong kinds, odd text, broken bytes.

Each boundary's test builds a structurally valid document and puts one of these values
into one field (so a refusal can be checked for naming that field), or throws a whole
document or byte string of them at the parser.
"""

from __future__ import annotations

import string
import warnings
import zipfile

from hypothesis import strategies as st

# Text a file name, a certificate field or a log line should not take on trust.
PATH_TRICKS = [
    "..", ".", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "~", "~root/x", "a\x00b", "\x00",
    "a\n", "\nname", "name\n", " name", "name ", "\t", "CON", "a" * 300, "ü" * 70, "\u202eevil", "\ufeffname",
    "-rf", "*", "?", "%2e%2e", "..%2f", "\r\n", "\x7f", "\udcff",
]
CONTROL = "".join(chr(c) for c in range(32)) + "\x7f\x85\u2028\u2029"

hostile_text = st.one_of(
    st.sampled_from(PATH_TRICKS),
    st.text(max_size=40),
    st.text(alphabet=CONTROL + string.ascii_letters, max_size=12),
    st.text(min_size=1, max_size=8).map(lambda s: s * 64),  # long
)
hostile_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**63, 2**64, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
hostile_scalars = st.one_of(st.none(), st.booleans(), hostile_numbers, hostile_text, st.just(""))


def hostile_values(max_leaves: int = 6) -> st.SearchStrategy:
    """Any YAML/JSON-shaped value: scalars, lists and mappings of them, nested."""
    return st.recursive(
        hostile_scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(hostile_text, st.integers(-3, 3), st.booleans()), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def json_safe(value):
    """``value`` with what JSON cannot carry as keys made strings (for JSON documents)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


# Bytes that are not what a parser expects: empty, invalid UTF-8, other encodings, nesting bombs.
# Past the recursion limit, each (quick to parse: the YAML parser takes seconds over "[[[...").
DEEP = ["- " * 1100 + "x", '{"a":' * 1100 + "1" + "}" * 1100]
BROKEN_TEXTS = [
    b"", b"\x00", b"\xff\xfe\x00garbage", b"\xef\xbb\xbf", b"\xc3\x28", b"\xed\xa0\x80", b"---\n...\n---\n",
    "é: ü".encode("latin-1"), "name: ü".encode("utf-16"), b"\t\tkey: value", b"&a [*a]", b"!!python/object:os.system x",
    b"{a: 1, a: 2}", b"? [a, b]\n: c", b"1" * 5000, b"- " * 10 + b"[",
] + [d.encode() for d in DEEP]
broken_bytes = st.one_of(st.sampled_from(BROKEN_TEXTS), st.binary(max_size=200))


def examples(n: int):
    """Settings for a test of ``n`` examples (ten times as many under the ``explore`` profile)."""
    from hypothesis import settings

    scale = 10 if settings().derandomize is False and settings().max_examples >= 1000 else 1
    return settings(max_examples=n * scale)


def yaml_text(doc) -> str:
    """``doc`` as YAML; lone surrogates (which UTF-8 cannot hold) are written as escapes."""
    import yaml

    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = yaml.safe_dump(doc, allow_unicode=False, sort_keys=False)
    return text


# ---- archives ----------------------------------------------------------------------------

ENTRY_MODES = [0, 0o100644, 0o100755, 0o120777, 0o040755, 0o010644, 0o140644, 0o060644, 0o104755]
entry_names = st.one_of(
    st.sampled_from(PATH_TRICKS + ["a/", "a//b", "./a", "a/./b", "a/../b", "//a", "C:\\x", "a/b/"]),
    st.text(alphabet=string.ascii_letters + "./\\-_\x00\n", min_size=0, max_size=12),
).filter(lambda n: _utf8(n))
zip_entries = st.lists(
    st.tuples(entry_names, st.binary(max_size=64), st.sampled_from(ENTRY_MODES),
              st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])),
    max_size=6,
)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def zip_bytes(entries, prefix: str = "") -> bytes:
    """A zip of ``(name, data, mode, compression)`` entries, each name under ``prefix``, as given."""
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": duplicates are the point
        with zipfile.ZipFile(buffer, "w") as zf:
            for name, data, mode, compression in entries:
                info = zipfile.ZipInfo(prefix + name, (1980, 1, 1, 0, 0, 0))
                info.external_attr = mode << 16
                info.compress_type = compression
                zf.writestr(info, data)
    return buffer.getvalue()


# Damage done to a valid archive: (position as a fraction of its length, new byte) pairs, or a cut.
damage = st.one_of(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda flips: ("flip", flips)
    ),
    st.floats(0, 1, exclude_max=True).map(lambda at: ("cut", at)),
    st.binary(min_size=1, max_size=64).map(lambda tail: ("append", tail)),
)


def damaged(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "cut":
        return data[: int(len(data) * arg)]
    if kind == "append":
        return data + arg
    out = bytearray(data)
    for at, value in arg:
        out[int(len(out) * at)] = value
    return bytes(out)


def entries_before_the_start(archive: bytes) -> bytes:
    """``archive`` (a zip without a comment) whose end record puts the central directory 1000 bytes
    further on, so that every entry's offset lands before the archive's start (found by fuzzing)."""
    end = bytearray(archive[-22:])
    assert end[:4] == b"PK\x05\x06"
    end[16:20] = (int.from_bytes(end[16:20], "little") + 1000).to_bytes(4, "little")
    return archive[:-22] + bytes(end)
