"""``--junit``: a JUnit XML file for CI systems (one test suite per cell, one test case per case)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packager.fidelity.report import VerifyReport


def render(report: "VerifyReport") -> ET.ElementTree:
    """The report as a ``<testsuites>`` tree."""
    failures = errors = tests = 0
    root = ET.Element("testsuites", name=f"packager verify {report.name}", time=f"{report.seconds:.3f}")
    for row in report.rows:
        suite = ET.SubElement(root, "testsuite", name=f"{row.format}/{row.runtime}/{row.device}",
                              time=f"{row.seconds:.3f}")
        s_tests = s_fail = s_err = 0
        if row.error:
            case = ET.SubElement(suite, "testcase", name="load", classname=suite.get("name", ""))
            ET.SubElement(case, "error", message=row.error, type="runtime").text = row.error
            s_tests, s_err = s_tests + 1, s_err + 1
        static = list(row.contract) + [f"{c.name}: {c.detail}" for c in row.structure if not c.passed]
        case = ET.SubElement(suite, "testcase", name="contract and structure", classname=suite.get("name", ""))
        s_tests += 1
        if static:
            ET.SubElement(case, "failure", message=static[0], type="contract").text = "\n".join(static)
            s_fail += 1
        for result in row.cases:
            case = ET.SubElement(suite, "testcase", name=result.case, classname=suite.get("name", ""))
            s_tests += 1
            degenerate = [o.degenerate for o in result.outputs if o.degenerate]
            if degenerate:  # passing or not, a CI reader should see that parity proved little
                ET.SubElement(case, "system-out").text = "\n".join(degenerate)
            if result.passed:
                continue
            lines = [result.error or ""] + result.contract + [f"{o.name}: {o.problem}" for o in result.outputs
                                                              if not o.passed]
            text = "\n".join(line for line in lines if line)
            tag = "error" if result.verdict == "runtime" else "failure"
            ET.SubElement(case, tag, message=text.splitlines()[0] if text else result.verdict,
                          type=result.verdict).text = text
            s_fail += tag == "failure"
            s_err += tag == "error"
        suite.set("tests", str(s_tests))
        suite.set("failures", str(s_fail))
        suite.set("errors", str(s_err))
        tests, failures, errors = tests + s_tests, failures + s_fail, errors + s_err
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    return ET.ElementTree(root)


def write_junit(report: "VerifyReport", path: str | Path) -> Path:
    """Write the JUnit XML report."""
    path = Path(path)
    tree = render(report)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path
