"""scripts/serve_soak.py's short form: a few hundred requests of every kind (hang-ups, slow
bodies, malformed JSON, oversize bodies, bad keys, contexts added and deleted under load)
from 8 clients against a real server on 127.0.0.1, then SIGTERM. The script checks every
answer against `Context.encode`, memory, /metrics against the clients' counts and the
drain, and exits 1 on any failure; this test also reads its figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUESTS, CLIENTS = 240, 8


@pytest.mark.slow
def test_short_soak(tiny_checkpoint, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import serve_soak

    out = tmp_path / "soak.json"
    code = serve_soak.main(["--model", str(tiny_checkpoint[1]), "--requests", str(REQUESTS),
                            "--clients", str(CLIENTS), "--json", str(out)])
    figures = json.loads(out.read_text())
    assert code == 0 and figures["failures"] == [], figures
    assert figures["requests"] == REQUESTS
    assert set(figures["kinds"]) >= {"embed", "hang_up", "slow_body", "malformed", "oversize"}
    assert sum(figures["kinds"].values()) == REQUESTS
    assert figures["worst_rel_err"] <= 1e-5 and figures["metrics_consistent"]
    assert figures["rss_growth"] <= 0.05
    assert (figures["drained"], figures["exit_code"]) == (CLIENTS, 0)
