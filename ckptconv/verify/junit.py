"""JUnit XML for CI systems: one test case per compared parameter (plus the config and the
logits tier), so a failed verification shows which parameter failed and why."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from .diagnose_layers import split_layer
from .report import Report, logits_line


def _classname(name: str) -> str:
    s = split_layer(name)
    return f"ckptconv.verify.layers.{s[1]}" if s else "ckptconv.verify.model"


def junit_xml(report: Report) -> str:
    cases = []
    for r in report.results:
        tc = ET.Element("testcase", classname=_classname(r.name), name=r.name, time="0")
        if not r.ok:
            msg = r.diagnosis or " ".join(x for x in (r.status, r.rule, r.detail) if x)
            fail = ET.SubElement(tc, "failure", message=msg, type=r.status)
            fail.text = (f"status={r.status} rule={r.rule} max_abs={r.max_abs} max_rel={r.max_rel} "
                         f"n_diff={r.n_diff} numel={r.numel}\n{r.detail}\n{r.diagnosis}").strip()
        cases.append(tc)
    if report.logits is not None:
        tc = ET.Element("testcase", classname="ckptconv.verify.logits", name="logits", time="0")
        if not report.logits["ok"]:
            ET.SubElement(tc, "failure", message=logits_line(report.logits), type="logits")
        cases.append(tc)
    failures = sum(1 for c in cases if c.find("failure") is not None)
    suite = ET.Element("testsuite", name="ckptconv.verify", tests=str(len(cases)), failures=str(failures),
                       errors="0", skipped="0", time=f"{report.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (("a", report.a), ("b", report.b), ("layout", report.layout),
                 ("equivalent", str(report.equivalent).lower())):
        ET.SubElement(props, "property", name=k, value=v)
    suite.extend(cases)
    root = ET.Element("testsuites", tests=str(len(cases)), failures=str(failures), errors="0")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
