"""A draft data-protection impact assessment (GDPR art. 35), written from the configuration.

The draft states what the configuration and the code guarantee (sources, purposes, retention,
roles, mitigations) and leaves what only the controller can decide as clearly marked TODOs.
It is rendered as Markdown (:func:`dpia_markdown`) and as PDF (:func:`write_dpia`, fpdf2 with a
core font: no font files needed, text transliterated to Latin-1).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from fpdf import FPDF
from fpdf.enums import TableCellFillMode, XPos, YPos
from fpdf.fonts import FontFace

from cityward.governance.policy import ROLE_HELP, matrix_markdown
from cityward.governance.register import NEVER_STATEMENTS, retention_text
from cityward.governance.sources import UNDECLARED, Catalog, DataSource, PersonalData

TODO = "**TODO (controller):**"

# Necessity and proportionality of the purposes cityward ships with; others get a TODO.
_NECESSITY: dict[str, str] = {
    "traffic-management": "Managing traffic flow, signal timing and incidents is a statutory "
    "task of the city. It needs vehicle counts, occupancy and speeds per road section; it does "
    "not need to know who is travelling, so only counts and aggregates are processed.",
    "environment-monitoring": "Monitoring air quality and noise is required to assess limit "
    "values and inform residents. Concentrations and sound levels at fixed stations are "
    "sufficient; nothing about individual people is processed.",
    "public-safety": "Detecting incidents (stopped vehicles, people on the carriageway, crowd "
    "density) lets the control room respond quickly. Events and counts are enough for this; "
    "no person is identified or followed, and snapshots are anonymized at the edge.",
    UNDECLARED: "Not a purpose of its own: it gives access to data that matches no declared "
    "source, so that the data-protection officer can classify it. Such data is treated as "
    "personal until it is declared.",
}

_RISKS: tuple[tuple[str, str, str, str], ...] = (
    (
        "Re-identification of people from indirect data (counts, crowd density, timestamps "
        "combined with other sources)",
        "low",
        "medium",
        "Only aggregates are stored (counts per interval, never tracks or identifiers); no "
        "identification features exist in the code; access to indirect data needs a token "
        "bound to its purpose and every read is audited.",
    ),
    (
        "Function creep: data collected for one purpose used for another",
        "medium",
        "high",
        "Purpose-bound tokens: every token carries its purposes and sees only the sources "
        "declared for them; the catalog is published in the public register and in this "
        "document; undeclared data is readable only with the `undeclared` purpose.",
    ),
    (
        "Unauthorized access to the data bank or the API",
        "medium",
        "medium",
        "Every route needs a permission of the role matrix (nothing is open by accident: an "
        "unknown route needs admin); refused requests are audited; the data stays on the "
        "city's own machines with no telemetry or external calls.",
    ),
    (
        "Insider misuse by staff with legitimate access",
        "medium",
        "medium",
        "Least privilege by role and purpose; history exports and reads of personal or "
        "indirect data are recorded in the audit trail with actor, purpose and entities; the "
        "auditor role reviews the trail without access to city data.",
    ),
    (
        "Tampering with the audit trail to hide misuse",
        "low",
        "high",
        "Hash-chained, HMAC-sealed audit trail; `cityward audit verify` detects any changed, "
        "removed or reordered record; keep the seal key away from the database.",
    ),
    (
        "Over-retention: data kept longer than needed",
        "medium",
        "medium",
        "Retention per source in the catalog, enforced by the retention scheduler; every "
        "retention run is audited with what it deleted.",
    ),
    (
        "Camera snapshots showing people or licence plates",
        "medium",
        "high",
        "Edge anonymization: frames are analysed inside the camera worker and never leave it; "
        "faces and plates are blurred before any snapshot is stored; no face recognition, "
        "plate reading or tracking exists in cityward at all.",
    ),
)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _pd(source: DataSource) -> str:
    value = source.personal_data.value
    return f"**{value}**" if source.personal_data != PersonalData.NONE else value


def _selects(source: DataSource) -> str:
    parts = [f"`{t}`" for t in source.types]
    parts += [f"id matches `{p}`" for p in source.id_patterns]
    return ", ".join(parts)


def _interval_text(seconds: float) -> str:
    s = float(seconds)
    for unit, size in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0)):
        if s >= size and s % size == 0:
            n = int(s // size)
            return f"{n} {unit}" + ("" if n == 1 else "s")
    n_s = f"{s:g}"
    return f"{n_s} second" + ("" if n_s == "1" else "s")


def _backend_name(backend: str) -> str:
    b = backend.lower()
    if b.startswith(("postgres", "pg")):
        return "PostgreSQL"
    if b.startswith("sqlite"):
        return "SQLite"
    return backend


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def dpia_markdown(
    catalog: Catalog,
    *,
    site_name: str,
    generated_at: str,
    backend: str,
    retention_interval_s: float,
) -> str:
    """The DPIA draft as Markdown, from the catalog, the roles and the running configuration."""
    sources = catalog.sources
    backend_name = _backend_name(backend)
    sensitive = [s for s in sources if s.personal_data != PersonalData.NONE]
    out: list[str] = [
        f"# Data protection impact assessment (draft): {site_name}",
        "",
        f"Generated by cityward on {generated_at} from the running configuration "
        f"(data bank: {backend_name}). This is a draft under GDPR art. 35: the sections below "
        "describe what the configuration and the software guarantee; the points marked "
        f"{TODO} can only be completed by the controller and the data-protection officer.",
        "",
        "## 1. Description of the processing",
        "",
        f"cityward collects readings from the city's sensors and cameras for {site_name} into "
        "a data bank (NGSI-LD) and makes them available to the control room, analysts and "
        "city services. The declared data sources are:",
        "",
    ]
    out += _table(
        (
            "source",
            "kind",
            "entity types",
            "purposes",
            "legal basis",
            "personal data",
            "retention",
            "owner",
        ),
        [
            (
                f"**{s.name}** ({s.id})" if s in sensitive else f"{s.name} ({s.id})",
                s.kind.value,
                _selects(s),
                ", ".join(s.purposes),
                s.legal_basis,
                _pd(s),
                f"{s.retention} ({retention_text(s.retention)})",
                s.owner,
            )
            for s in sources
        ],
    )
    out.append("")
    if sensitive:
        out += [
            "**Attention:** these sources process personal data (indirect or personal) and "
            "need particular care in this assessment:",
            "",
        ]
        out += [
            f"- **{s.name}** ({s.id}): {s.personal_data.value}"
            + (f". {s.description}" if s.description else "")
            for s in sensitive
        ]
        out.append("")
    else:
        out += ["No declared source is marked as processing personal data.", ""]
    out += [
        "Data that matches no declared source belongs to the undeclared source: it is treated "
        f"as personal data, readable only with the `{UNDECLARED}` purpose, kept for "
        f"{retention_text(catalog.undeclared.retention)} and never listed in the public "
        "register until it is classified.",
        "",
        "What is computed from each source, and what never is:",
        "",
    ]
    for s in sources:
        out.append(f"### {s.name} ({s.id})")
        out.append("")
        if s.description:
            out += [s.description, ""]
        computes = "; ".join(s.computes) or "nothing beyond the stored readings"
        out.append(f"- Computed: {computes}")
        out.append(f"- Never computed: {'; '.join(s.never_computes) or '-'}")
        out.append(f"- Contact: {s.contact or TODO + ' add a contact'}")
        out.append("")
    out += [
        "## 2. Data flows",
        "",
        "- Devices (sensors, signal controllers, camera workers) send readings to the ingest "
        "endpoints of cityward, authenticated with their own device keys.",
        f"- Ingest writes them into the data bank ({backend_name}) on the city's own machines.",
        "- The API and the dashboard serve the data to authenticated staff, each token limited "
        "to its role and purposes; the public register shows only what the register lists.",
        "- Camera frames stay inside the video worker at the camera: they are analysed there "
        "(anonymized at the edge) and only counts and events are sent on; faces and licence "
        "plates are blurred before any snapshot is stored.",
        "- There is no transfer outside the city's machines: no cloud service, no third-party "
        "analytics and no telemetry.",
        "",
        "What cityward never does:",
        "",
    ]
    out += [f"- {n}" for n in NEVER_STATEMENTS]
    out += ["", "## 3. Purposes, necessity and proportionality", ""]
    for purpose in catalog.purposes:
        serving = [s for s in sources if purpose in s.purposes]
        out.append(f"### Purpose: {purpose}")
        out.append("")
        if serving:
            out.append("Sources: " + ", ".join(f"{s.name} ({s.id})" for s in serving) + ".")
            out.append("")
        text = _NECESSITY.get(purpose)
        if text is None:
            text = f"{TODO} explain why this purpose needs these sources and why less data "
            text += "would not do."
        out += [text, ""]
    out += [
        "## 4. Retention",
        "",
        "Each source's history is kept for its retention period, then deleted by the retention "
        f"scheduler, which runs every {_interval_text(retention_interval_s)} "
        f"({retention_interval_s:g} s). Every run is recorded in the audit trail.",
        "",
    ]
    out += _table(
        ("source", "retention (ISO 8601)", "in words"),
        [
            *((f"{s.name} ({s.id})", s.retention, retention_text(s.retention)) for s in sources),
            (
                f"{catalog.undeclared.name} ({UNDECLARED})",
                catalog.undeclared.retention,
                retention_text(catalog.undeclared.retention),
            ),
        ],
    )
    out.append("")
    if backend_name == "SQLite":
        out.append(
            "Deletion on SQLite runs with `secure_delete` on, so deleted rows are overwritten "
            "in the database file, not merely unlinked."
        )
    elif backend_name == "PostgreSQL":
        out.append(
            "On PostgreSQL, history is stored in time partitions; expired partitions are "
            "dropped as a whole, so no deleted row stays behind in a live table."
        )
    else:
        out.append(
            "Deletion uses `secure_delete` on SQLite and drops expired partitions on PostgreSQL."
        )
    out += [
        "",
        "## 5. Access",
        "",
        "Roles:",
        "",
    ]
    out += _table(("role", "who and what"), [(r.value, ROLE_HELP[r]) for r in ROLE_HELP])
    out += [
        "",
        "Permission matrix (enforced for every route; a route that matches no entry needs admin):",
        "",
        matrix_markdown(),
        "",
        "Purpose binding: every token carries the purposes it was issued for and reads only "
        "the sources declared for those purposes; a device writes only its own entities; only "
        "admin tokens carry all purposes. Reads of indirect or personal data, history exports, "
        "configuration changes and refused requests are written to the audit trail with the "
        "actor, role and purposes.",
        "",
        "## 6. Risks and mitigations",
        "",
    ]
    out += _table(("risk", "likelihood", "severity", "mitigation in cityward"), _RISKS)
    out += [
        "",
        f"Residual risk: {TODO} assess after the mitigations above and the measures of the "
        "controller (organisation, training, physical security).",
        "",
        "## 7. Open points for the controller",
        "",
        f"- {TODO} name the controller, the data-protection officer and their contact.",
        f"- {TODO} confirm the legal basis of every source (section 1) and record the law that "
        "gives the public task.",
        f"- {TODO} justify each retention period (section 4) or shorten it.",
        f"- {TODO} record the views of data subjects or their representatives (art. 35(9)) "
        "and the information given on site (signs at cameras, art. 13).",
        f"- {TODO} list processors and hosting contracts (art. 28), if any.",
        f"- {TODO} decide who may hold admin and auditor tokens and how they are issued.",
        f"- {TODO} assess residual risk and decide whether prior consultation of the "
        "supervisory authority is needed (art. 36).",
        f"- {TODO} set the review date of this assessment and sign it off.",
    ]
    for s in sources:
        if not s.contact:
            out.append(f"- {TODO} give a contact for the source {s.name} ({s.id}).")
        if s.personal_data == PersonalData.PERSONAL:
            out.append(
                f"- {TODO} the source {s.name} ({s.id}) processes personal data: describe the "
                "categories of data subjects and the safeguards specific to it."
            )
    out.append("")
    return "\n".join(out)


# -- PDF ----------------------------------------------------------------------------------------

_TRANSLIT = {
    "\u2013": "-",
    "\u2014": "-",
    "\u2212": "-",
    "\u2010": "-",
    "\u2011": "-",
    "\u2018": "'",
    "\u2019": "'",
    "\u201a": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u2026": "...",
    "\u2022": "-",
    "\u2192": "->",
    "\u2190": "<-",
    "\u2264": "<=",
    "\u2265": ">=",
    "\u2260": "!=",
    "\u20ac": "EUR",
    "\u2122": "(TM)",
    "\u2713": "yes",
    "\u2717": "no",
    "\u00a0": " ",
    "\u202f": " ",
    "\u2009": " ",
    "\u200b": "",
    "\u0141": "L",
    "\u0142": "l",
    "\u0110": "D",
    "\u0111": "d",
    "\u0152": "OE",
    "\u0153": "oe",
    "\u0131": "i",
    "\u0126": "H",
    "\u0127": "h",
}


def latin1_safe(text: str) -> str:
    """Text the PDF core fonts can encode: common symbols transliterated, accents kept when
    Latin-1 has them, stripped otherwise, anything else as '?'."""
    out: list[str] = []
    for ch in text:
        if ord(ch) < 256:
            out.append(ch)
            continue
        if ch in _TRANSLIT:
            out.append(_TRANSLIT[ch])
            continue
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if ord(c) < 256)
        out.append(base if base.strip() or ch.isspace() else "?")
    return "".join(out)


def _inline(text: str) -> str:
    """Markdown inline markup as fpdf2 understands it: bold kept, code ticks dropped, the other
    fpdf2 markers (``__``, ``--``, ``~~``) escaped so they print as written."""
    text = latin1_safe(text.replace("`", ""))
    text = text.replace("\\|", "|")
    for marker in ("__", "--", "~~"):
        text = text.replace(marker, "\\" + marker)
    return text


def _split_row(line: str) -> list[str]:
    body = line.strip()
    body = body.removeprefix("|")
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


class _DpiaPDF(FPDF):
    doc_title = ""

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("helvetica", size=8)
        self.set_text_color(90)
        self.cell(0, 6, latin1_safe(f"{self.doc_title} - page {self.page_no()}"), align="C")
        self.set_text_color(0)


def _col_widths(rows: Sequence[Sequence[str]]) -> tuple[float, ...]:
    n = max(len(r) for r in rows)
    widths = []
    for i in range(n):
        cells = [r[i].replace("**", "").replace("`", "") for r in rows if i < len(r)]
        longest = max((len(c) for c in cells), default=1)
        # wide enough for the longest word (no breaks inside words), more for long texts
        word = min(max((len(w) for c in cells for w in c.split()), default=1), 25)
        widths.append(max(word * 1.15 + 3, min(longest, 40) * 0.7, 4.0))
    return tuple(widths)


def _render_table(pdf: FPDF, rows: list[list[str]]) -> None:
    n = max(len(r) for r in rows)
    rows = [r + [""] * (n - len(r)) for r in rows]
    size = 9.0 if n <= 3 else 8.0 if n <= 5 else 7.0
    pdf.set_font("helvetica", size=size)
    with pdf.table(
        col_widths=_col_widths(rows),
        text_align="LEFT",
        markdown=True,
        line_height=size * 0.5,
        padding=1,
        headings_style=FontFace(emphasis="BOLD", fill_color=(225, 230, 240)),
        cell_fill_color=(246, 246, 246),
        cell_fill_mode=TableCellFillMode.ROWS,
        v_align="TOP",
    ) as table:
        for r in rows:
            row = table.row()
            for c in r:
                row.cell(_inline(c))
    pdf.ln(2)


def render_pdf(markdown: str, title: str = "Data protection impact assessment") -> bytes:
    """The Markdown of :func:`dpia_markdown` as a PDF: headings (with bookmarks), paragraphs,
    bullet lists and tables, in a core font."""
    pdf = _DpiaPDF(format="A4")
    pdf.doc_title = latin1_safe(title)
    pdf.set_title(latin1_safe(title))
    pdf.set_creator("cityward")
    pdf.set_lang("en")
    pdf.set_margins(18, 18, 18)
    pdf.set_auto_page_break(True, margin=18)
    pdf.add_page()
    lines = markdown.splitlines()
    i = 0
    level = -1
    paragraph: list[str] = []
    in_list = False

    def flush() -> None:
        if paragraph:
            pdf.set_font("helvetica", size=10)
            pdf.multi_cell(
                0, 5, _inline(" ".join(paragraph)), markdown=True, align="L", new_x=XPos.LMARGIN
            )
            pdf.ln(2)
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            if in_list:
                pdf.ln(1.5)
                in_list = False
            i += 1
            continue
        heading = _HEADING.match(stripped)
        if heading:
            flush()
            depth = len(heading.group(1))
            text = latin1_safe(heading.group(2).replace("`", "").replace("**", ""))
            size = {1: 17.0, 2: 14.0, 3: 11.5}.get(depth, 10.5)
            level = min(depth - 1, level + 1)
            if pdf.will_page_break(size + 14):
                pdf.add_page()
            pdf.ln(2 if depth > 2 else 4)
            pdf.start_section(text, level=level)
            pdf.set_font("helvetica", style="B", size=size)
            pdf.multi_cell(0, size * 0.5, text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1.5)
            i += 1
            continue
        if stripped.startswith("|"):
            flush()
            rows: list[list[str]] = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                if not _SEPARATOR.match(lines[i].strip()):
                    rows.append(_split_row(lines[i]))
                i += 1
            if rows:
                _render_table(pdf, rows)
            continue
        bullet = _BULLET.match(line)
        if bullet:
            flush()
            pdf.set_font("helvetica", size=10)
            pdf.set_x(pdf.l_margin + 2)
            pdf.cell(4, 5, "-")
            pdf.multi_cell(
                0, 5, _inline(bullet.group(1)), markdown=True, align="L", new_x=XPos.LMARGIN
            )
            pdf.ln(0.8)
            in_list = True
            i += 1
            continue
        paragraph.append(stripped)
        i += 1
    flush()
    return bytes(pdf.output())


def write_dpia(out_dir: Path, markdown: str) -> tuple[Path, Path]:
    """Write ``dpia.md`` and ``dpia.pdf`` into ``out_dir`` (created when missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / "dpia.md"
    pdf_path = out_dir / "dpia.pdf"
    md_path.write_text(markdown, encoding="utf-8")
    first = next((ln for ln in markdown.splitlines() if ln.startswith("# ")), "")
    title = first[2:].strip() or "Data protection impact assessment"
    pdf_path.write_bytes(render_pdf(markdown, title=title))
    return md_path, pdf_path
