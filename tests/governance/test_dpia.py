"""The DPIA draft: Markdown from the configuration, and its PDF rendering."""

from __future__ import annotations

import contextlib
import re
import zlib
from pathlib import Path

from cityward.governance.dpia import dpia_markdown, latin1_safe, render_pdf, write_dpia
from cityward.governance.policy import ROLE_HELP, Permission, matrix_markdown
from cityward.governance.sources import (
    UNDECLARED,
    Catalog,
    DataSource,
    PersonalData,
    default_sources,
)

RISKS = (
    "Re-identification",
    "Function creep",
    "Unauthorized access",
    "Insider misuse",
    "Tampering with the audit trail",
    "Over-retention",
    "Camera snapshots",
)


def catalog() -> Catalog:
    complaints = DataSource(
        id="complaints",
        name="Citizen complaints — “noise” reports",
        kind="other",
        id_patterns=(r"urn:ngsi-ld:Complaint:(a|b)-\d+",),
        purposes=("complaint-handling",),
        legal_basis="GDPR art. 6(1)(e)",
        personal_data=PersonalData.PERSONAL,
        retention="P2Y",
        owner="Citizen services",
    )
    return Catalog([*default_sources(), complaints])


def draft(backend: str = "sqlite", interval: float = 3600) -> str:
    return dpia_markdown(
        catalog(),
        site_name="Ghent",
        generated_at="2026-03-01T12:00:00Z",
        backend=backend,
        retention_interval_s=interval,
    )


def test_markdown_covers_sources_purposes_access_and_risks() -> None:
    cat = catalog()
    md = draft()
    assert md.startswith("# Data protection impact assessment (draft): Ghent")
    assert "2026-03-01T12:00:00Z" in md
    for n, title in enumerate(
        (
            "Description of the processing",
            "Data flows",
            "Purposes, necessity and proportionality",
            "Retention",
            "Access",
            "Risks and mitigations",
            "Open points for the controller",
        ),
        start=1,
    ):
        assert f"## {n}. {title}" in md
    for s in cat.sources:
        assert s.name in md and s.id in md
        assert s.legal_basis in md
        assert s.owner in md
        for t in s.types:
            assert f"`{t}`" in md
    # a regex alternation does not break the table
    assert r"(a\|b)" in md
    for purpose in cat.purposes:
        assert f"### Purpose: {purpose}" in md
    # the purpose without built-in text is left to the controller
    section = md.split("### Purpose: complaint-handling", 1)[1].split("###", 1)[0]
    assert "Citizen complaints" in section and "TODO (controller)" in section
    assert matrix_markdown() in md
    for perm in Permission:
        assert f"`{perm.value}`" in md
    for role, text in ROLE_HELP.items():
        assert f"| {role.value} | {text} |" in md
    assert "| risk | likelihood | severity | mitigation in cityward |" in md
    for risk in RISKS:
        assert re.search(
            rf"^\| {re.escape(risk)}.*\| (low|medium|high) \| (low|medium|high) \|", md, re.M
        )
    for mitigation in ("purpose-bound tokens", "cityward audit verify", "retention scheduler"):
        assert mitigation.lower() in md.lower()
    assert "Edge anonymization" in md
    assert "## 7. Open points" in md and md.count("TODO (controller)") >= 8
    assert UNDECLARED in md


def test_personal_data_sources_are_highlighted() -> None:
    md = draft()
    assert "**indirect**" in md and "**personal**" in md
    attention = md.split("**Attention:**", 1)[1].split("\n\n", 2)[1]
    assert "traffic-cameras" in attention and "complaints" in attention
    assert "air-quality" not in attention
    assert "| **Traffic cameras (counts only, anonymized at the edge)** (traffic-cameras) |" in md
    assert "| Air quality stations (air-quality) |" in md


def test_data_flows_and_retention_follow_the_backend() -> None:
    sqlite = draft("sqlite", 3600)
    assert "SQLite" in sqlite and "secure_delete" in sqlite
    assert "every 1 hour (3600 s)" in sqlite
    assert "no telemetry" in sqlite and "video worker" in sqlite
    for s in catalog().sources:
        assert f"| {s.name} ({s.id}) | {s.retention} |" in sqlite
    pg = draft("postgres", 900)
    assert "PostgreSQL" in pg and "partitions" in pg and "secure_delete" not in pg
    assert "every 15 minutes (900 s)" in pg


def _pdf_text(pdf: bytes) -> str:
    """The text shown by a PDF that fpdf2 wrote with a core font (no PDF library needed)."""
    chunks: list[bytes] = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        data = m.group(1)
        with contextlib.suppress(zlib.error):
            data = zlib.decompress(data)
        for lit in re.finditer(rb"\(((?:\\.|[^\\)])*)\)\s*Tj", data, re.S):
            raw = re.sub(rb"\\([()\\])", rb"\1", lit.group(1))
            chunks.append(raw)
    return b"".join(chunks).decode("latin-1")


def test_write_dpia_writes_markdown_and_pdf(tmp_path: Path) -> None:
    md = draft()
    md_path, pdf_path = write_dpia(tmp_path / "out", md)
    assert md_path == tmp_path / "out" / "dpia.md"
    assert pdf_path == tmp_path / "out" / "dpia.pdf"
    assert md_path.read_text(encoding="utf-8") == md
    pdf = pdf_path.read_bytes()
    assert pdf.startswith(b"%PDF")
    assert pdf.rstrip().endswith(b"%%EOF")
    pages = len(re.findall(rb"/Type\s*/Page\b", pdf))
    assert pages > 1
    text = re.sub(r"\s+", "", _pdf_text(pdf))
    for s in catalog().sources:
        assert re.sub(r"\s+", "", latin1_safe(s.name)) in text, s.name
    for needle in ("6.Risksandmitigations", "register:read", "TODO(controller)"):
        assert needle in text
    # the non-Latin-1 characters of a source name were transliterated, not dropped
    assert 'Citizencomplaints-"noise"reports' in text


def test_pdf_survives_unusual_text() -> None:
    md = "\n".join(
        [
            "# Title with – dash, “quotes”, € and ✓ and 中文",
            "",
            "A paragraph with `code`, --not underline--, __not italics__ and ~~x~~ \\ slash.",
            "",
            "- a bullet with **bold**",
            "1. a numbered item",
            "",
            "| a | b |",
            "|---|---|",
            "| x \\| y | " + "verylongwordwithoutspaces" * 8 + " |",
            "| short row |",
        ]
    )
    pdf = render_pdf(md)
    assert pdf.startswith(b"%PDF")
    text = _pdf_text(pdf)
    assert "--not underline--" in text.replace("\\", "")
    assert "x | y" in text


def test_latin1_safe() -> None:
    assert latin1_safe("Gent – “Korenmarkt” …") == 'Gent - "Korenmarkt" ...'
    assert latin1_safe("Zürich, Łódź, Ďábel") == "Zürich, Lódz, Dábel"
    assert latin1_safe("中") == "?"
    latin1_safe("any text " * 3).encode("latin-1")
