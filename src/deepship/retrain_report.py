"""retrain_report.json (every number) and retrain_report.html (the same, readable) for `deepship retrain`."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deepship.files import atomic_write_text, write_json
from deepship.htmlpage import esc, page, table

JSON_NAME, HTML_NAME = "retrain_report.json", "retrain_report.html"
SCHEMA_VERSION = 1


def data_findings(run_dir: Path) -> dict[str, Any]:
    """What validation found in the challenger's training data (the run's data report, abridged)."""
    report = json.loads((run_dir / "data_report.json").read_text())
    splits = report.get("splits", {})
    return {"path": str(run_dir / "data_report.json"), "fingerprint": report.get("fingerprint"),
            "totals": report.get("totals"), "warnings": report.get("warnings", []),
            "quarantined": report.get("quarantine", [])[:50],
            "duplicates": {name: s.get("duplicates", {}).get("count", 0) for name, s in splits.items()},
            "leakage": {name: e.get("count", 0) for name, e in report.get("leakage", {}).items()},
            "label_conflicts": report.get("label_conflicts", {"count": 0, "examples": []})}


def write_retrain_report(fields: dict[str, Any], out: Path) -> dict[str, Any]:
    """`fields`: exit_code, decision, champion, challenger (with run_dir), data, lineage."""
    report = {"schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **fields, "data_report": data_findings(Path(fields["challenger"]["run_dir"]))}
    write_json(out / JSON_NAME, report)
    atomic_write_text(out / HTML_NAME, render_html(report))
    return report


# ------------------------------------------------------------------------------------- HTML
def interval(ci: Any) -> str:
    return "-" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def metric_rows(decision: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for role, side in (("challenger", decision.get("candidate")), ("production (champion)", decision.get("current"))):
        if side:
            value = side.get("value")
            rows.append([role, side.get("version"), side.get("metric"), "-" if value is None else f"{value:.4f}",
                         interval(side.get("ci95"))])
    if decision.get("diff") is not None:
        rows.append(["difference", "", "challenger - champion", f"{decision['diff']:+.4f}",
                     interval(decision.get("diff_ci95"))])
    return rows


def data_section(data: dict[str, Any]) -> str:
    new, held = data["new_training"], data["decision_set"]
    classes = list(new["per_class"])
    rows = [[c, new["per_class"][c], held["per_class"].get(c, 0)] for c in classes]
    leak = held["leakage_removed"]
    return ("<h2>Data added</h2>"
            f"<p>{data['labeled']} labeled inputs from <code>{esc(data['log'])}</code> (labels "
            f"<code>{esc(data['labels'])}</code>), ordered by {esc(data['ordered_by'])}: the most recent "
            f"{held['n']} are the decision set, never trained on.</p>"
            + table(["class", "added to training", "decision set"], rows)
            + f"<p>{leak['count']} decision inputs also occurred in the training data and were removed.</p>")


def findings_section(findings: dict[str, Any]) -> str:
    t = findings.get("totals") or {}
    conflicts = findings["label_conflicts"]
    warnings = "".join(f"<li>{esc(w)}</li>" for w in findings["warnings"]) or "<li>none</li>"
    return ("<h2>Data report findings</h2>"
            f"<p>{t.get('read', 0)} samples read, {t.get('quarantined', 0)} quarantined; duplicates "
            f"{esc(findings['duplicates'])}; leakage into val/test {esc(findings['leakage'])}; "
            f"{conflicts['count']} label conflicts. Full report: <code>{esc(findings['path'])}</code></p>"
            f"<ul>{warnings}</ul>"
            + table(["split", "sample", "reason"], [[q["split"], q["origin"], q["reason"]]
                                                    for q in findings["quarantined"]]))


def render_html(report: dict[str, Any]) -> str:
    d = report["decision"]
    verdict = "promoted" if d["promoted"] else "refused"
    parts = [f"<h1>Retrain: {esc(report['champion']['name'])}</h1>",
             f"<p class='{'pass' if d['promoted'] else 'fail'}'><b>{verdict}</b> (exit {report['exit_code']}): "
             f"{esc(d['reason'])}</p>",
             "<h2>Both models on the decision set</h2>"
             + table(["model", "version", "metric", "value", "95% interval"], metric_rows(d)),
             data_section(report["data"]), findings_section(report["data_report"]),
             "<h2>Lineage of the new version</h2><pre>" + esc(json.dumps(report["lineage"], indent=2)) + "</pre>"]
    return page("deepship retrain report", "".join(parts))
