"""PRIVACY.md and the code that cites it stay in step.

PRIVACY.md numbers the privacy invariants ("## 6. ..." headings) and names the tests that check
each one (``tests/<file>.py::<test>``). The code cites the numbers in comments and docstrings.
These tests fail when a citation names a number the document does not define, when a citation
does not say where the invariant is written, when the document names a test that does not exist
(renamed, deleted or moved to another file), or when an invariant lists no test at all.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "PRIVACY.md"
# Where citations live: the package, its tests and benchmarks, the C++ sources, the README.
CITING = [ROOT / "rmt_kernels", ROOT / "tests", ROOT / "bench", ROOT / "csrc", ROOT / "README.md"]
SUFFIXES = {".py", ".h", ".cpp", ".cu", ".md"}
HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)
# "invariant 6", "invariants 1, 2, 6, 7, 8 and 9" (possibly across a line break).
CITATION = re.compile(r"\binvariants?\s+(\d+(?:\s*(?:,|,?\s*and)\s*\d+)*)", re.IGNORECASE)
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
# What else the document names in backticks: a path in the repository, a dotted name in the
# package, a method or attribute of one of the package's classes.
PATH_REFERENCE = re.compile(r"`((?:rmt_kernels|csrc|bench|tests)/[\w/.]*)`")
DOTTED_REFERENCE = re.compile(r"`(rmt_kernels(?:\.\w+)+)`")
MEMBER_REFERENCE = re.compile(r"`([A-Z]\w*)\.(\w+)`")
# A citation must name the document within this many characters (the same sentence, in practice).
POINTER_WINDOW = 120


def defined_invariants(doc: str) -> list[int]:
    """The invariant numbers PRIVACY.md's headings define, in order."""
    return [int(n) for n in HEADING.findall(doc)]


def _prose(text: str) -> str:
    """``text`` with line breaks and the comment markers that follow them (``#``, ``//``)
    collapsed to one space, so a citation split over two comment lines reads as one."""
    return re.sub(r"\s*\n\s*(?:#|//)?\s*", " ", text)


def citations(text: str) -> list[tuple[list[int], bool]]:
    """Each invariant citation in ``text``: the numbers it names, and whether PRIVACY.md is named
    within :data:`POINTER_WINDOW` characters of it."""
    prose = _prose(text)
    found = []
    for m in CITATION.finditer(prose):
        numbers = [int(n) for n in re.findall(r"\d+", m.group(1))]
        near = prose[max(0, m.start() - POINTER_WINDOW) : m.end() + POINTER_WINDOW]
        found.append((numbers, "PRIVACY.md" in near))
    return found


def citing_files() -> list[Path]:
    files = []
    for root in CITING:
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        files += [p for p in paths if p.is_file() and p.suffix in SUFFIXES]
    return files


@functools.cache
def defined_tests(path: Path) -> set[str]:
    """The test functions of a test file, module level and inside classes."""
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
    }


def missing_tests(doc: str) -> list[str]:
    """Each ``file::test`` PRIVACY.md names that does not exist, with where a test of that name
    is now, if anywhere (to help whoever moved it)."""
    everywhere: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name in defined_tests(path):
            everywhere.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    missing = []
    for file, name in TEST_REFERENCE.findall(doc):
        path = ROOT / file
        if not path.is_file() or name not in defined_tests(path):
            elsewhere = everywhere.get(name)
            missing.append(f"{file}::{name}" + (f" (now in {elsewhere})" if elsewhere else ""))
    return missing


@functools.cache
def package_classes() -> dict[str, set[str]]:
    """Every class defined in rmt_kernels, with the names its body defines (methods,
    attributes)."""
    classes: dict[str, set[str]] = {}
    for path in sorted((ROOT / "rmt_kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(item.name)
                    elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
                        members.add(item.attr)
    return classes


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module of the package or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def missing_names(doc: str) -> list[str]:
    """The paths, package names and class members PRIVACY.md names that do not exist."""
    missing = [p for p in PATH_REFERENCE.findall(doc) if not (ROOT / p).exists()]
    missing += [d for d in DOTTED_REFERENCE.findall(doc) if not _resolves(d)]
    classes = package_classes()
    missing += [
        f"{cls}.{member}"
        for cls, member in MEMBER_REFERENCE.findall(doc)
        if cls in classes and member not in classes[cls]
    ]
    return missing


def sections(doc: str) -> dict[int, str]:
    """Each invariant's section of PRIVACY.md, by number."""
    parts = HEADING.split(doc)
    return {int(number): body for number, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_the_document_numbers_its_invariants_from_1_without_gaps():
    numbers = defined_invariants(DOC.read_text())
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert len(numbers) >= 10


def test_every_citation_names_a_defined_invariant_and_points_to_the_document():
    defined = set(defined_invariants(DOC.read_text()))
    undefined, unpointed = [], []
    for path in citing_files():
        if path == Path(__file__).resolve():
            continue  # this file's examples are not citations
        for numbers, pointed in citations(path.read_text(errors="replace")):
            where = f"{path.relative_to(ROOT)}: invariant {numbers}"
            if not set(numbers) <= defined:
                undefined.append(where)
            if not pointed:
                unpointed.append(where)
    assert not undefined, f"citations of invariants PRIVACY.md does not define: {undefined}"
    assert not unpointed, f"citations that do not name PRIVACY.md beside them: {unpointed}"


def test_the_code_cites_the_document_and_never_the_planning_note():
    cited = False
    planning_note = "DESIGN" + ".md"
    for path in citing_files():
        text = path.read_text(errors="replace")
        assert planning_note not in text, f"{path.relative_to(ROOT)} cites {planning_note}"
        cited |= bool(citations(text))
    assert cited, "no citation found: the pattern no longer matches the code's citations"


def test_every_test_the_document_names_exists():
    missing = missing_tests(DOC.read_text())
    assert not missing, f"PRIVACY.md names tests that do not exist: {missing}"


def test_every_path_module_and_method_the_document_names_exists():
    missing = missing_names(DOC.read_text())
    assert not missing, f"PRIVACY.md names what does not exist (moved or renamed?): {missing}"


def test_every_invariant_lists_tests():
    for number, body in sections(DOC.read_text()).items():
        assert TEST_REFERENCE.search(body), f"invariant {number} lists no test"


def test_the_checks_fail_on_an_undefined_citation_a_missing_pointer_and_a_missing_test():
    # The parsers above must be able to fail: a citation of an undefined number, one without the
    # document's name, a split "invariants 1, 2,\n# 11" and a test that does not exist.
    text = (
        "# privacy invariant 6, PRIVACY.md\n"
        "# invariants 1, 2,\n# 11 and 12 (see PRIVACY.md)\n"
        + "x = 1\n" * 40
        + "# invariant 3 alone\n"
    )
    assert citations(text) == [([6], True), ([1, 2, 11, 12], True), ([3], False)]
    doc = "## 1. One\n`tests/test_privacy_doc.py::test_no_such_test`\n## 2. Two\nnone\n"
    assert defined_invariants(doc) == [1, 2]
    assert missing_tests(doc) == ["tests/test_privacy_doc.py::test_no_such_test"]
    assert not TEST_REFERENCE.search(sections(doc)[2])
    names = "`rmt_kernels/no_such.py` `rmt_kernels.dp.no_such` `PrivateEngine.no_such` `Denoiser`"
    assert missing_names(names) == [
        "rmt_kernels/no_such.py",
        "rmt_kernels.dp.no_such",
        "PrivateEngine.no_such",
    ]
