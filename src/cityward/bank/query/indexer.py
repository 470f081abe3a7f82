"""Turn a stored entity document into ``attr_index`` rows (see docs/bank-internals.md)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from cityward.bank.query.qlang import Date, DateTime, Path, Str, Time, Uri, utc_instant

SEP = "\x1f"
SCOPE_PATH = "\x1fscope"

VT_PRESENT = 0  # the path exists but holds no scalar here (object, empty array, null, geometry)
VT_NUMBER = 1
VT_STRING = 2
VT_BOOL = 3
VT_URI = 4  # the object of a Relationship or an element of a ListRelationship
# a typed value {"@type": "DateTime", "@value": v}: txt is v's instant in UTC, fixed width
# (utc_instant), so that text order is time order whatever zone or precision v was written in
VT_DATETIME = 5
# the @type of a typed value that is an NGSI-LD DateTime (as written, compacted or not)
DATETIME_TYPES = frozenset(
    {
        "DateTime",
        "ngsi-ld:DateTime",
        "https://uri.etsi.org/ngsi-ld/DateTime",
        "xsd:dateTime",
        "http://www.w3.org/2001/XMLSchema#dateTime",
    }
)

TIMESTAMP_META = frozenset({"observedAt", "createdAt", "modifiedAt"})
# attribute system times are not in attr_index (see _instance); q on them is refused
UNINDEXED_META = frozenset({"createdAt", "modifiedAt"})

Row: TypeAlias = tuple[str, int, float | None, str | None]
_Add: TypeAlias = Callable[[Row], None]


def normalize_timestamp(s: str) -> str:
    """Give a ...Z timestamp exactly six fraction digits, so that string order is time order.

    Anything that is not ``YYYY-MM-DDThh:mm:ss[.f]Z`` (by length and punctuation) is returned
    unchanged; this runs for every write, so it checks shape cheaply instead of with a regex.
    """
    n = len(s)
    if n == 27 and s[19] == "." and s[26] == "Z":
        return s
    if n < 20 or s[-1] != "Z" or s[10] != "T":
        return s
    if n == 20:
        return s[:19] + ".000000Z"
    if s[19] == "." and n > 21 and s[20:-1].isdigit():
        # Extra digits are cut, not rounded: rounding could carry into the seconds.
        return s[:20] + (s[20:-1] + "000000")[:6] + "Z"
    return s


_DATETIME_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z")
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def literal_text(value: Str | Uri | DateTime | Date | Time, timestamp: bool) -> str:
    """The txt a string-like q literal is compared with; on timestamp paths dates normalize.

    On ``attr.observedAt``/``createdAt``/``modifiedAt`` the stored values are normalized
    timestamps, so a DateTime (quoted or not, in any zone) is turned into the same UTC form
    and a Date means midnight UTC of that day. Elsewhere the literal is compared as written.
    """
    text = value.value if isinstance(value, (Str, Uri)) else value.text
    if timestamp and not isinstance(value, (Uri, Time)):
        instant = utc_instant(text)
        if instant is not None:
            return instant
        if _DATETIME_TEXT.fullmatch(text):  # not a real date: the old text normalization
            return normalize_timestamp(text)
        if _DATE_TEXT.fullmatch(text):
            return text + "T00:00:00.000000Z"
    return text


def instant_text(value: Str | Uri | DateTime | Date | Time) -> str | None:
    """The txt a q literal is compared with on DateTime values (vt 5), or None: it is not
    compared with them.

    A DateTime, or a quoted string that is one, means its instant; a Date (quoted or not)
    midnight UTC of that day, as on observedAt. Other strings, Times and URIs are not
    DateTimes, so they never equal or order against one.
    """
    if isinstance(value, (Uri, Time)):
        return None
    text = value.value if isinstance(value, Str) else value.text
    instant = utc_instant(text)
    if instant is not None:
        return instant
    if _DATE_TEXT.fullmatch(text):
        return utc_instant(text + "T00:00:00Z")  # None for a day that does not exist
    return None


_PATH_IDS: dict[str, int] = {}


def path_id(path: str) -> int:
    """The stable 63-bit id stored in ``attr_index.path`` for an attribute path.

    Paths are long IRIs; short integer keys make the secondary indexes several times smaller
    and faster to keep up. A 64-bit BLAKE2b digest makes a collision practically impossible
    (about 2^-40 at a million distinct paths).
    """
    pid = _PATH_IDS.get(path)
    if pid is None:
        digest = hashlib.blake2b(path.encode(), digest_size=8).digest()
        pid = int.from_bytes(digest, "big", signed=True)
        if len(_PATH_IDS) < 1_000_000:
            _PATH_IDS[path] = pid
    return pid


def path_key(path: Path, expand: Callable[[str], str]) -> str:
    """The ``attr_index.path`` of a q path: attribute and sub-attribute names get expanded."""
    key = expand(path.attr)
    for sub in path.subs:
        key += SEP + expand(sub)
    if path.meta is not None:
        key += SEP + "#" + path.meta
    for member in path.member:
        key += SEP + "[" + member
    return key


def _number(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:  # an int beyond the float range; it still orders correctly
        return math.inf if v > 0 else -math.inf


def _value(path: str, v: Any, add: _Add) -> None:
    """Rows for a JSON value: scalars as they are, arrays per element, objects per member."""
    t = type(v)
    if t is str:
        add((path, VT_STRING, None, v))
    elif t is int or t is float:  # exact type checks: bool is a subclass of int
        add((path, VT_NUMBER, _number(v), None))
    elif t is bool:
        add((path, VT_BOOL, 1.0 if v else 0.0, None))
    elif t is list:
        if v:
            for item in v:
                _value(path, item, add)
        else:
            add((path, VT_PRESENT, None, None))
    elif t is dict:
        if "@value" in v:  # a typed value such as {"@type": "DateTime", "@value": "..."}
            raw, vtype = v["@value"], v.get("@type")
            if type(raw) is str and type(vtype) is str and vtype in DATETIME_TYPES:
                instant = utc_instant(raw)
                if instant is not None:  # a malformed one stays a string, as written
                    add((path, VT_DATETIME, None, instant))
                    return
            _value(path, raw, add)
            return
        add((path, VT_PRESENT, None, None))
        for key, item in v.items():
            _value(path + SEP + "[" + key, item, add)
    else:  # null inside a value, or anything JSON does not have
        add((path, VT_PRESENT, None, None))


def _uris(path: str, v: Any, add: _Add) -> None:
    """Rows for an ``object`` or ``objectList`` payload (URIs, vt 4)."""
    if type(v) is str:
        add((path, VT_URI, None, v))
    elif type(v) is list and v:
        for item in v:
            if type(item) is dict:  # tolerate the {"object": URI} input form
                item = item.get("object")
            if type(item) is str:
                add((path, VT_URI, None, item))
            else:
                add((path, VT_PRESENT, None, None))
    else:
        add((path, VT_PRESENT, None, None))


def _instance(path: str, inst: Mapping[str, Any], add: _Add) -> None:
    """Rows for one attribute instance: its payload, metadata and sub-attributes."""
    if "value" in inst:
        if inst.get("type") == "GeoProperty":
            add((path, VT_PRESENT, None, None))  # geo queries use the geo table instead
        else:
            _value(path, inst["value"], add)
    elif "object" in inst:
        _uris(path, inst["object"], add)
    elif "languageMap" in inst:
        add((path, VT_PRESENT, None, None))
        any_path = path + SEP + "[*"
        for lang, text in inst["languageMap"].items():
            _value(path + SEP + "[" + lang, text, add)
            _value(any_path, text, add)
    elif "valueList" in inst:
        _value(path, inst["valueList"], add)
    elif "objectList" in inst:
        _uris(path, inst["objectList"], add)
    elif "json" in inst:
        _value(path, inst["json"], add)
    elif "vocab" in inst:
        vocab = inst["vocab"]
        _value(path, vocab if type(vocab) is list else [vocab], add)
    else:
        add((path, VT_PRESENT, None, None))

    v = inst.get("observedAt")
    if type(v) is str:
        add((path + SEP + "#observedAt", VT_STRING, None, normalize_timestamp(v)))
    v = inst.get("unitCode")
    if type(v) is str:
        add((path + SEP + "#unitCode", VT_STRING, None, v))
    v = inst.get("datasetId")
    if type(v) is str:
        add((path + SEP + "#datasetId", VT_STRING, None, v))
    # createdAt/modifiedAt are not indexed: two rows per attribute would more than double the
    # index writes of every batch, for a filter nobody asked for (sqlgen says so clearly).
    subs = inst.get("sub")
    if subs:
        for iri, sub in subs.items():
            sub_path = path + SEP + iri
            if type(sub) is list:
                for one in sub:
                    _instance(sub_path, one, add)
            else:
                _instance(sub_path, sub, add)


def index_rows(doc: Mapping[str, Any]) -> list[Row]:
    """All ``attr_index`` rows ``(path, vt, num, txt)`` of a stored document, scope included."""
    rows: list[Row] = []
    add = rows.append
    attrs = doc.get("attrs")
    if attrs:
        for iri, instances in attrs.items():
            if type(instances) is list:
                for inst in instances:
                    _instance(iri, inst, add)
            else:
                _instance(iri, instances, add)
    scope = doc.get("scope")
    if scope:
        for s in [scope] if type(scope) is str else scope:
            add((SCOPE_PATH, VT_STRING, None, s))
    return rows
