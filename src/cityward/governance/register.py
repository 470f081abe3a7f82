"""The public register: every sensor and camera, what it is for and what is never done with it.

Generated from the same :class:`~cityward.governance.sources.Catalog` the access checks use, so
the register cannot describe a source differently from how cityward treats it. Entities are
assigned to sources with :meth:`Catalog.source_of`, the rule the access checks apply.

Entities of the undeclared source are only counted: they are not classified yet, so nothing is
published about them individually.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cityward.bank.jsonld import Context, ContextResolver
from cityward.bank.store import Store
from cityward.governance.sources import (
    DERIVED_PREFIX,
    UNDECLARED,
    Catalog,
    DataSource,
    PersonalData,
)

# What cityward never does, whatever the configuration: there is no code for any of it.
NEVER_STATEMENTS: tuple[str, ...] = (
    "No face recognition.",
    "No licence-plate reading.",
    "No tracking of people or devices (phones, cars, bicycles) from place to place.",
    "No re-identification of people across cameras or over time.",
    "Raw camera frames never leave the camera worker: images are analysed where they are taken "
    "and only counts and events are stored.",
    "Faces and licence plates are blurred before any snapshot is stored.",
)

PERSONAL_DATA_TEXT: dict[PersonalData, str] = {
    PersonalData.NONE: "No personal data: this source says nothing about people.",
    PersonalData.INDIRECT: "Indirect: information about people only in aggregate (for example "
    "counts of pedestrians), never about a single person.",
    PersonalData.PERSONAL: "Personal data: it can relate to identifiable people. Access is "
    "restricted and every read is logged.",
}

UNDECLARED_NOTE = (
    "Data that matches no declared source. It is treated as personal data and is not listed "
    "here until it has been classified; only the number of such entities is published."
)

PAGE_SIZE = 1000  # Store.iter_docs reads pages of this many entities (keyset paging on pk)


@dataclass(frozen=True, slots=True)
class RegisterDevice:
    """One entity as the register shows it: id, short type name and (lon, lat) or None."""

    id: str
    type: str
    location: tuple[float, float] | None = None


class DevicesBySource(dict[str, list[RegisterDevice]]):
    """Declared source id -> its devices (sorted by id), plus the count of undeclared entities
    and, for sources the register does not list one by one (``DataSource.listed``), their
    entity counts (their lists stay empty)."""

    undeclared_count: int = 0
    counts: dict[str, int]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.counts = {}


@lru_cache(maxsize=1)
def _core() -> Context:
    return ContextResolver(allow_fetch=False).core


def _location_iri() -> str:
    return _core().expand("location")


def _positions(coords: Any) -> Iterator[tuple[float, float]]:
    """Every (lon, lat) position in a GeoJSON coordinates array, at any nesting depth."""
    if (
        isinstance(coords, list | tuple)
        and len(coords) >= 2
        and all(isinstance(c, int | float) and not isinstance(c, bool) for c in coords[:2])
    ):
        yield float(coords[0]), float(coords[1])
        return
    if isinstance(coords, list | tuple):
        for item in coords:
            yield from _positions(item)


def representative_point(geometry: Any) -> tuple[float, float] | None:
    """A Point's position; for other geometries the mean of their distinct positions."""
    if not isinstance(geometry, dict):
        return None
    if geometry.get("type") == "GeometryCollection":
        points = [representative_point(g) for g in geometry.get("geometries") or []]
        found = [p for p in points if p is not None]
        return _mean(found)
    coords = geometry.get("coordinates")
    if geometry.get("type") == "Point":
        first = next(_positions(coords), None)
        return first
    # distinct positions: a polygon ring repeats its first position at the end
    return _mean(list(dict.fromkeys(_positions(coords))))


def _mean(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    if not points:
        return None
    lon = sum(p[0] for p in points) / len(points)
    lat = sum(p[1] for p in points) / len(points)
    return round(lon, 7), round(lat, 7)


def _location(doc: Mapping[str, Any]) -> tuple[float, float] | None:
    instances = doc.get("attrs", {}).get(_location_iri()) or []
    geo = [i for i in instances if isinstance(i, dict) and i.get("type") == "GeoProperty"]
    # the default instance (no datasetId) first
    geo.sort(key=lambda i: "datasetId" in i)
    for inst in geo:
        point = representative_point(inst.get("value"))
        if point is not None:
            return point
    return None


def _type_candidates(types: Sequence[str]) -> list[str]:
    """The entity's type IRIs each followed by its core-context short name.

    The catalog maps short names to sources (and IRIs when it was given an expansion map), so
    both spellings are offered to :meth:`Catalog.source_of`, in the entity's own type order.
    """
    core = _core()
    out: list[str] = []
    for t in types:
        out.append(t)
        short = core.compact(t)
        if short != t:
            out.append(short)
    return out


def _short_type(types: Sequence[str], source: DataSource) -> str:
    """The entity's type as a short name, preferring the type that placed it in ``source``."""
    core = _core()
    declared = set(source.types) | {core.expand(t) for t in source.types}
    for t in types:
        if t in declared or core.compact(t) in declared:
            return core.compact(t)
    return core.compact(types[0]) if types else ""


#: types of events rather than devices: never listed one by one, whatever their source
EVENT_TYPES = frozenset({"Alert", "RoadAccident"})


def _is_event(eid: str, types: Sequence[str]) -> bool:
    core = _core()
    return eid.startswith(DERIVED_PREFIX) or any(core.compact(t) in EVENT_TYPES for t in types)


def collect_entities(store: Store, catalog: Catalog, tenant: str = "") -> DevicesBySource:
    """For every declared source, the entities of ``tenant`` that belong to it.

    One pass over the tenant's entities in pages of :data:`PAGE_SIZE` (keyset paging, so tens of
    thousands of entities cost one read each), each assigned with :meth:`Catalog.source_of`.
    Every declared source has a key (an empty list when it has no entities yet); entities of
    the undeclared source are only counted, in ``undeclared_count``.
    """
    out = DevicesBySource({s.id: [] for s in catalog.sources})
    undeclared = 0
    for doc in store.iter_docs(tenant):
        eid = str(doc["id"])
        types = [str(t) for t in doc.get("type", [])]
        source = catalog.source_of(eid, _type_candidates(types))
        if source.id == UNDECLARED or source.id not in out:
            undeclared += 1
            continue
        if not source.listed or _is_event(eid, types):
            # counted, never listed with its place (see DataSource.listed): an alert is no
            # device, also where it belongs to a device's source (a derived alert of a traffic
            # detector, a camera's event alert)
            out.counts[source.id] = out.counts.get(source.id, 0) + 1
            continue
        out[source.id].append(RegisterDevice(eid, _short_type(types, source), _location(doc)))
    for devices in out.values():
        devices.sort(key=lambda d: d.id)
    out.undeclared_count = undeclared
    return out


# -- the register document ----------------------------------------------------------------------

_DURATION = re.compile(
    r"P(?:(?P<Y>[\d.,]+)Y)?(?:(?P<M>[\d.,]+)M)?(?:(?P<W>[\d.,]+)W)?(?:(?P<D>[\d.,]+)D)?"
    r"(?:T(?:(?P<h>[\d.,]+)H)?(?:(?P<m>[\d.,]+)M)?(?:(?P<s>[\d.,]+)S)?)?"
)
_UNIT_NAMES = {
    "Y": "year",
    "M": "month",
    "W": "week",
    "D": "day",
    "h": "hour",
    "m": "minute",
    "s": "second",
}


def retention_text(iso: str) -> str:
    """An ISO 8601 duration in words: ``P1Y`` -> "1 year", ``P90D`` -> "90 days"."""
    m = _DURATION.fullmatch(iso)
    if m is None:
        return iso
    parts: list[str] = []
    for unit, name in _UNIT_NAMES.items():
        raw = m.group(unit)
        if raw is None:
            continue
        number = raw.replace(",", ".")
        if "." in number:
            number = number.rstrip("0").rstrip(".")
        if number.lstrip("0") == "":
            continue
        parts.append(f"{number} {name}" + ("" if number == "1" else "s"))
    if not parts:
        return iso
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _device_json(d: RegisterDevice) -> dict[str, Any]:
    loc = {"lon": d.location[0], "lat": d.location[1]} if d.location is not None else None
    return {"id": d.id, "type": d.type, "location": loc}


_NOT_LISTED_WHY = {
    "vehicle": "vehicles on the move: their positions are not published",
    "derived": "computed by cityward, not devices installed in the city",
    "other": "not devices installed in the city",
}


def _source_json(
    source: DataSource, devices: Sequence[RegisterDevice], count: int | None = None
) -> dict[str, Any]:
    """``count``: the entities of a source that is not listed one by one."""
    listed = source.listed
    if not listed:
        devices = ()
    why = (
        ""
        if listed
        else "data about identifiable people"
        if source.personal_data is PersonalData.PERSONAL
        else _NOT_LISTED_WHY.get(source.kind.value, "not devices installed in the city")
    )
    return {
        "id": source.id,
        "name": source.name,
        "kind": source.kind.value,
        "types": list(source.types),
        "purposes": list(source.purposes),
        "legal_basis": source.legal_basis,
        "personal_data": source.personal_data.value,
        "personal_data_text": PERSONAL_DATA_TEXT[source.personal_data],
        "retention": {"iso": source.retention, "text": retention_text(source.retention)},
        "owner": source.owner,
        "contact": source.contact,
        "description": source.description,
        "computes": list(source.computes),
        "never_computes": list(source.never_computes),
        "listed": listed,
        "not_listed_why": why,
        "devices": [_device_json(d) for d in devices],
        "device_count": len(devices) if listed else 0,
        # a listed source's alerts (events, not devices) are counted with its devices
        "entity_count": len(devices) + (count or 0) if listed else (count or 0),
    }


def build_register(
    catalog: Catalog,
    devices_by_source: Mapping[str, Sequence[RegisterDevice]],
    site_name: str,
    site_contact: str,
    generated_at: str,
    *,
    undeclared_count: int | None = None,
) -> dict[str, Any]:
    """The register as a JSON-ready document (``/register.json``; input of :func:`render_html`).

    ``undeclared_count`` defaults to the count :func:`collect_entities` recorded.
    """
    if undeclared_count is None:
        undeclared_count = (
            devices_by_source.undeclared_count
            if isinstance(devices_by_source, DevicesBySource)
            else 0
        )
    counts = devices_by_source.counts if isinstance(devices_by_source, DevicesBySource) else {}
    sources = [
        _source_json(s, devices_by_source.get(s.id, ()), counts.get(s.id)) for s in catalog.sources
    ]
    return {
        "site": {"name": site_name, "contact": site_contact},
        "generated_at": generated_at,
        "never": list(NEVER_STATEMENTS),
        "sources": sources,
        "device_count": sum(s["device_count"] for s in sources),
        "undeclared": {
            "id": UNDECLARED,
            "name": catalog.undeclared.name,
            "device_count": undeclared_count,
            "note": UNDECLARED_NOTE,
        },
    }


# -- HTML ---------------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light dark; --fg: #1a1a1a; --bg: #ffffff; --muted: #555; --line: #ccc;
  --accent: #0b5394; --warn: #7a4a00; --warnbg: #fff4e0; }
@media (prefers-color-scheme: dark) { :root { --fg: #eee; --bg: #141414; --muted: #bbb;
  --line: #444; --accent: #8cb9ff; --warn: #ffd28a; --warnbg: #3a2a10; } }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); line-height: 1.5; margin: 0 auto; max-width: 72rem; padding: 1rem; }
a { color: var(--accent); }
a:focus, summary:focus { outline: 3px solid var(--accent); outline-offset: 2px; }
h1 { font-size: 1.8rem; } h2 { font-size: 1.4rem; margin-top: 2.5rem; } h3 { font-size: 1.1rem; }
.muted { color: var(--muted); }
.never { border: 2px solid var(--accent); border-radius: .5rem; padding: .5rem 1.25rem; }
.source { border-top: 1px solid var(--line); }
.personal { background: var(--warnbg); color: var(--warn); padding: .1rem .4rem;
  border-radius: .25rem; }
dl { display: grid; grid-template-columns: minmax(10rem, max-content) 1fr; gap: .25rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .95rem; }
caption { text-align: left; font-weight: 600; padding: .25rem 0; }
th, td { border: 1px solid var(--line); padding: .3rem .5rem; text-align: left;
  vertical-align: top; }
td.id { font-family: ui-monospace, monospace; word-break: break-all; }
.skip { position: absolute; left: -999px; } .skip:focus { left: 1rem; top: 1rem; }
"""

_KIND_TEXT = {
    "sensor": "sensor",
    "camera": "camera (analysed on the spot, counts only)",
    "signal": "traffic signal",
    "vehicle": "vehicles on the move (their positions are not published)",
    "derived": "computed by cityward from other data",
    "other": "other",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _contact_html(contact: str) -> str:
    text = contact.strip()
    if not text:
        return ""
    if re.fullmatch(r"[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"']+", text):
        return f'<a href="mailto:{_e(text)}">{_e(text)}</a>'
    if re.fullmatch(r"https?://[^\s<>\"']+", text):
        return f'<a href="{_e(text)}">{_e(text)}</a>'
    return _e(text)


def _anchor(source_id: str) -> str:
    return "source-" + re.sub(r"[^A-Za-z0-9._-]", "-", source_id)


def _purpose_text(purpose: str) -> str:
    return purpose.replace("-", " ").replace("_", " ")


def _device_rows(devices: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    for d in devices:
        loc = d.get("location")
        if isinstance(loc, Mapping):
            lon, lat = loc.get("lon"), loc.get("lat")
            cell = (
                f'<a href="geo:{_e(lat)},{_e(lon)}" '
                f'aria-label="Open the location {_e(lat)}, {_e(lon)} in a map application">'
                f"{_e(lon)}, {_e(lat)}</a>"
            )
        else:
            cell = '<span class="muted">no location given</span>'
        yield (
            f'<tr><td class="id">{_e(d.get("id", ""))}</td><td>{_e(d.get("type", ""))}</td>'
            f"<td>{cell}</td></tr>"
        )


def _list(items: Sequence[Any], empty: str) -> str:
    if not items:
        return f'<p class="muted">{_e(empty)}</p>'
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _source_html(s: Mapping[str, Any]) -> str:
    anchor = _anchor(str(s["id"]))
    personal = s.get("personal_data", "none")
    pd_class = ' class="personal"' if personal != "none" else ""
    retention = s.get("retention") or {}
    devices = s.get("devices") or []
    count = int(s.get("device_count", len(devices)))
    purposes = ", ".join(_purpose_text(str(p)) for p in s.get("purposes", []))
    parts = [
        f'<section class="source" id="{_e(anchor)}" aria-labelledby="{_e(anchor)}-h">',
        f'<h2 id="{_e(anchor)}-h">{_e(s["name"])}</h2>',
    ]
    if s.get("description"):
        parts.append(f"<p>{_e(s['description'])}</p>")
    parts += [
        "<dl>",
        f"<dt>Kind</dt><dd>{_e(_KIND_TEXT.get(str(s.get('kind')), s.get('kind', '')))}</dd>",
        f"<dt>Operator</dt><dd>{_e(s.get('owner', ''))}</dd>",
        f"<dt>Why we collect it</dt><dd>{_e(purposes)}</dd>",
        f"<dt>Legal basis</dt><dd>{_e(s.get('legal_basis', ''))}</dd>",
        f"<dt>Data about people</dt><dd><span{pd_class}>"
        f"{_e(s.get('personal_data_text', personal))}</span></dd>",
        f"<dt>How long we keep it</dt><dd>{_e(retention.get('text', ''))} "
        f'<span class="muted">({_e(retention.get("iso", ""))})</span></dd>',
    ]
    contact = _contact_html(str(s.get("contact", "")))
    if contact:
        parts.append(f"<dt>Questions</dt><dd>{contact}</dd>")
    parts.append("</dl>")
    parts += [
        f'<h3 id="{_e(anchor)}-measure">What is computed from the data</h3>',
        _list(s.get("computes") or [], "Nothing is computed from this source."),
        f'<h3 id="{_e(anchor)}-never">What we never compute from it</h3>',
        _list(s.get("never_computes") or [], ""),
        f'<h3 id="{_e(anchor)}-where">Where the devices are</h3>',
    ]
    if s.get("listed") is False:
        n = int(s.get("entity_count", 0))
        parts.append(
            f'<p class="muted">{n} {"record" if n == 1 else "records"} at the moment, not '
            f"listed one by one: {_e(s.get('not_listed_why', ''))}.</p>"
        )
    elif devices:
        noun = "device" if count == 1 else "devices"
        parts += [
            '<div class="table-wrap"><table>',
            f"<caption>{count} {noun}: {_e(s['name'])}</caption>",
            '<thead><tr><th scope="col">Device</th><th scope="col">Type</th>'
            '<th scope="col">Location (longitude, latitude)</th></tr></thead><tbody>',
            *_device_rows(devices),
            "</tbody></table></div>",
        ]
    else:
        parts.append('<p class="muted">No devices of this kind are installed at the moment.</p>')
    events = int(s.get("entity_count", 0)) - int(s.get("device_count", 0))
    if s.get("listed") is not False and events > 0:
        parts.append(
            f'<p class="muted">And {events} {"record" if events == 1 else "records"} computed '
            "from them (alerts), not listed one by one.</p>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def render_html(register: Mapping[str, Any]) -> str:
    """The register as one self-contained, accessible HTML5 page (no external resources)."""
    site = register.get("site") or {}
    site_name = str(site.get("name", ""))
    sources: list[Mapping[str, Any]] = list(register.get("sources") or [])
    total = int(register.get("device_count", 0))
    title = f"Sensors and cameras in {site_name}" if site_name else "Sensors and cameras"
    contact = _contact_html(str(site.get("contact", "")))
    generated = _e(register.get("generated_at", ""))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(title)}: public register</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        '<a class="skip" href="#main">Skip to the register</a>',
        "<header>",
        f"<h1>{_e(title)}</h1>",
        "<p>This public register lists every sensor and camera that sends data to the city's "
        "data bank: where it is, who operates it, why, what is computed from it, what is never "
        "computed from it, on which legal basis and how long the data is kept.</p>",
        f'<p class="muted">Generated on <time datetime="{generated}">{generated}</time> from '
        f"the same configuration that controls who may see the data. {total} "
        f"{'device' if total == 1 else 'devices'} in {len(sources)} data sources.</p>",
    ]
    if contact:
        out.append(f"<p>Questions about your data: {contact}</p>")
    out += [
        "</header>",
        '<main id="main">',
        '<section class="never" aria-labelledby="never-h">',
        '<h2 id="never-h">What we never do</h2>',
        _list(register.get("never") or [], ""),
        "</section>",
        '<nav aria-labelledby="contents-h">',
        '<h2 id="contents-h">What we measure here</h2>',
        "<ul>",
    ]
    for s in sources:
        listed = s.get("listed") is not False
        count = int(s.get("device_count" if listed else "entity_count", 0))
        noun = ("device" if count == 1 else "devices") if listed else "records"
        out.append(
            f'<li><a href="#{_e(_anchor(str(s["id"])))}">{_e(s["name"])}</a> ({count} {noun})</li>'
        )
    out += ["</ul>", "</nav>"]
    out.extend(_source_html(s) for s in sources)
    undeclared = register.get("undeclared") or {}
    n_undeclared = int(undeclared.get("device_count", 0))
    if n_undeclared:
        out += [
            '<section class="source" id="undeclared" aria-labelledby="undeclared-h">',
            f'<h2 id="undeclared-h">{_e(undeclared.get("name", "Undeclared data"))}</h2>',
            f"<p>{_e(undeclared.get('note', UNDECLARED_NOTE))}</p>",
            f"<p>Entities not yet classified: <strong>{n_undeclared}</strong>.</p>",
            "</section>",
        ]
    out += [
        "</main>",
        "<footer>",
        '<p class="muted">Generated by cityward. This page loads nothing from other sites.</p>',
        "</footer>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(out)
