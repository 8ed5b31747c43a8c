"""Per-example evidence end to end: stored by every finished run, used by the report, a report written from
the database alone (a fresh process without the study's plugins), and databases of older spach versions."""
from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from spach.battle import db, load_study, run_study, write_report
from test_battle_run import micro

ROOT = Path(__file__).resolve().parents[1]

TOKEN_MEAN = '''
import torch.nn as nn
import spach


@spach.register_mixer("tokenmean")
class TokenMean(nn.Module):
    """A weight-free plugin: every token minus the mean of all tokens."""

    def __init__(self, dim):
        super().__init__()

    def forward(self, x):
        return x.mean(dim=(1, 2), keepdim=True) - x
'''


def findings_section(report: Path) -> str:
    text = report.read_text()
    return text[text.index("## Findings"):text.index("## Runs")]


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    """A 1-epoch micro study of attention and a weight-free plugin, 2 seeds each."""
    from spach.models import registry

    tmp = tmp_path_factory.mktemp("verdicts")
    (tmp / "tokenmean.py").write_text(TOKEN_MEAN)
    spec = micro(grid={"family": ["attn", "tokenmean"], "layout": ["ms"], "size": ["nano"], "seed": [0, 1]},
                 extra=[], threads=1, plugins=["tokenmean.py"])
    spec["recipe"]["epochs"] = 1
    (tmp / "study.yaml").write_text(yaml.safe_dump(spec))
    try:
        run_study(load_study(tmp / "study.yaml"), tmp / "out", workers=1, quiet=True)
    finally:
        registry.unregister_mixer("tokenmean")
    return tmp / "out"


@pytest.mark.slow
def test_every_done_run_stores_its_per_example_evidence(study_out):
    conn = db.connect_readonly(study_out)
    runs = db.runs(conn)
    evidence = db.evidence(conn, [r["key"] for r in runs])
    assert set(evidence) == {r["key"] for r in runs if r["status"] == "done"} and len(evidence) == 4
    for r in runs:
        e = evidence[r["key"]]
        assert e["n"] == 64 and e["correct"].shape == (64,) and e["predictions"].shape == (64,)
        assert 100 * e["correct"].mean() == pytest.approx(r["final_top1"])  # the final epoch's evaluation
    assert len({e["targets_sha"] for e in evidence.values()}) == 1      # every run scored on the same images
    raw = conn.execute("SELECT length(correct) FROM evidence").fetchone()[0]
    assert raw == 8  # 64 images, bit-packed
    assert db.mixer_facts_of(conn) == {"attn": {"weight_free": False}, "tokenmean": {"weight_free": True}}
    conn.close()
    report = findings_section(study_out / "report.md")
    assert "per-example on 64 validation images" in report and "decisive" not in report
    assert "tokenmean ms nano — a weight-free mixer plus CPE matches attention" in report


@pytest.mark.slow
def test_a_report_from_the_database_alone_in_a_fresh_process(study_out, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_out, copy)
    shutil.rmtree(copy / "runs")  # the run directories (and the evidence files) are not needed
    subprocess.run([sys.executable, "-m", "spach.cli.main", "report", str(copy)], check=True, cwd=tmp_path,
                   capture_output=True)
    assert findings_section(copy / "report.md") == findings_section(study_out / "report.md")


@pytest.mark.slow
def test_a_database_of_an_older_spach_still_reports_and_is_not_changed(study_out, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(study_out, old)
    conn = sqlite3.connect(old / db.DB_NAME)
    conn.execute("DROP TABLE evidence")
    conn.execute("DELETE FROM meta WHERE k = 'mixer_facts'")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    digest = hashlib.sha256((old / db.DB_NAME).read_bytes()).hexdigest()
    section = findings_section(write_report(old, to=tmp_path / "report"))
    assert "lack per-example evidence for some seed" in section and "`attn-ms-nano`" in section
    assert "tokenmean: whether it is weight-free was not recorded in the database" in section
    assert hashlib.sha256((old / db.DB_NAME).read_bytes()).hexdigest() == digest


def test_evidence_is_packed_and_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, 1001)
    predictions = np.where(rng.random(1001) < 0.7, targets, rng.integers(0, 10, 1001))
    n, sha, bits, preds, dtype = db.pack_evidence(predictions, targets)
    assert n == 1001 and len(bits) == 126 and dtype == "uint8" and len(preds) == 1001
    assert np.array_equal(np.unpackbits(np.frombuffer(bits, np.uint8), count=n).astype(bool), predictions == targets)
    assert db.pack_evidence(predictions + 300, targets + 300)[4] == "uint16"
