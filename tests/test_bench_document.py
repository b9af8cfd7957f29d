"""make bench rewrites only the marked blocks of docs/BENCHMARKS.md; the prose around them stays."""

from __future__ import annotations

from benchmarks.figures import Figure, markdown_table, update_document


def _figure(key: str, ours: str) -> Figure:
    return Figure(key=key, title=f"Title {key}", command="python -m benchmarks", goal="g", anchor="a", ours=ours,
                  met=True, table=markdown_table(["x", "y"], [[1, 2]]))


def test_marked_blocks_are_replaced_and_prose_kept(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# B\n\nintro prose\n\n<!-- bench:one -->\nold\n<!-- /bench:one -->\n\nafter prose\n\n"
                   "<!-- bench:two -->\n<!-- /bench:two -->\nend\n")
    assert update_document(doc, [_figure("one", "first"), _figure("two", "second")]) == []
    text = doc.read_text()
    assert "old" not in text and "intro prose" in text and "after prose" in text and text.endswith("end\n")
    assert text.index("Ours: first") < text.index("after prose") < text.index("Ours: second")
    assert "| 1 | 2 |" in text and "**met**" in text
    update_document(doc, [_figure("one", "again")])  # a second pass replaces, never duplicates
    assert doc.read_text().count("<!-- bench:one -->") == 1 and "Ours: again" in doc.read_text()


def test_a_figure_without_markers_is_appended_as_a_section(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# B\n")
    assert update_document(doc, [_figure("new", "x")]) == ["new"]
    assert "## Title new\n\n<!-- bench:new -->" in doc.read_text()


def test_a_quick_pass_keeps_a_full_pass_figure(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("<!-- bench:one -->\n<!-- /bench:one -->\n")
    full = _figure("one", "five seeds")
    full.full = True
    update_document(doc, [full])
    update_document(doc, [_figure("one", "one seed")])
    assert "Ours: five seeds" in doc.read_text() and "full pass" in doc.read_text()
    update_document(doc, [_figure("two", "new")])  # a quick figure still lands where none was
    assert "Ours: new" in doc.read_text()
