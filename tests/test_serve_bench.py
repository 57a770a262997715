"""`m2f bench serve` on a tiny budget (loopback only): every setting measured in one run, the JSON and the plot
written next to each other, the fields present; never the timings themselves. Bad options: one line, exit 2."""
from __future__ import annotations

import json

import pytest

from m2f.cli import main

pytest.importorskip("ray.serve")


def test_bench_serve_writes_json_and_plot_for_every_setting(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["bench", "serve", "--clients", "2", "--requests", "4", "--max-batch", "4", "--batch-wait-ms", "200",
                 "--replicas", "1,2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].endswith("-serve.json") and files[1].endswith("-serve.png"), files
    assert files[0][: -len(".json")] == files[1][: -len(".png")]
    assert (out / files[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / files[0]).read_text())
    assert data["suite"] == "serve" and data["settings"]["model"] == "m2f-default-synth"
    assert [(r["replicas"], r["max_batch"]) for r in data["rows"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for row in data["rows"]:
        assert row["failed"] == 0 and row["requests"] == 4 and row["clients"] == 2, row
        assert row["throughput_rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], row
        # every request reported the batch it ran in: the batches add up to the requests
        assert sum(int(size) * count for size, count in row["batch_sizes"].items()) == 4, row
        if row["max_batch"] == 1:
            assert row["batch_sizes"] == {"1": 4} and row["mean_batch"] == 1.0, row
    assert "req/s" in printed and "p99 ms" in printed and str(out / files[0]) in printed


@pytest.mark.parametrize("option, value, needle", [
    ("--clients", "0", "--clients must be >= 1, got 0"),
    ("--max-batch", "1", "--max-batch must be >= 2"),
    ("--replicas", "1,x", "bad --replicas list '1,x'"),
    ("--batch-wait-ms", "nan", "--batch-wait-ms nan must be a finite number"),
])
def test_bench_serve_bad_options_are_one_line(tmp_path, capsys, option, value, needle):
    out = tmp_path / "results"
    assert main(["bench", "serve", option, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2f: error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()
