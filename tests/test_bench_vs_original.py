"""scripts/bench_vs_original.py without the original code: its commands, their order (peer and ours
interleaved), the parsing of both outputs and the summary, with every timing process faked."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_vs_original  # noqa: E402

# what step.py prints: the old transformers' warnings, then one JSON line
PEER_OUTPUT = ("Some weights of ElectraModel were not initialized from the model checkpoint\n"
               '{"impl": "renaissance", "freeze": "%s", "batch": 8, "image": 224, "ms_per_step": 4000.0, '
               '"samples_per_s": %s, "trainable_params": 38262844}\n')


def test_parse_peer_output_takes_its_json_line():
    assert bench_vs_original.parse_peer_output(PEER_OUTPUT % ("none", 1.64)) == 1.64
    with pytest.raises(ValueError, match="no JSON line with samples_per_s"):
        bench_vs_original.parse_peer_output("Traceback (most recent call last):\n{\"other\": 1}\n")


def test_runs_interleave_peer_and_ours_and_summarise(monkeypatch, tmp_path, capsys):
    calls = []
    peer_figures = iter([1.5, 2.5, 1.0, 2.0])  # none, both, none, both
    ours_figures = iter([3.0, 4.0, 5.0, 2.0, 4.0, 6.0])

    def fake_run(command, env, timeout):
        if "bench.py" in command[1]:
            assert env["PYTHONPATH"] != "/peer/site"  # ours never imports the peer's transformers
            variants = next(a for a in command if a.startswith("--variants=")).split("=", 1)[1].split(",")
            path = next(a for a in command if a.startswith("--json=")).split("=", 1)[1]
            rows = [{"variant": v, "samples_per_sec": next(ours_figures), "mfu": 0.4, "flops_per_sample": 3e10,
                     "load_average": 1.0} for v in variants]
            Path(path).write_text(json.dumps({"variants": rows}))
            calls.append(("ours", variants, command))
            return "a table\n"
        assert env["PYTHONPATH"] == "/peer/site" and env["OMP_NUM_THREADS"] == "2"
        freeze = command[command.index("--freeze") + 1]
        calls.append(("peer", freeze, command))
        return PEER_OUTPUT % (freeze, next(peer_figures))

    monkeypatch.setattr(bench_vs_original, "run", fake_run)
    figures = bench_vs_original.main(["--peer_dir=/peer/code", "--peer_site=/peer/site", "--rounds=2",
                                      "--freeze=none,both", "--extra_variants=none+shared", "--steps=3",
                                      f"--json={tmp_path / 'side.json'}"])
    assert [(side, what) for side, what, _ in calls] == [
        ("peer", "none"), ("ours", ["none"]), ("peer", "both"), ("ours", ["both", "none+shared"])] * 2
    peer_command, ours_command = calls[0][2], calls[1][2]
    assert peer_command[2:] == ["/peer/code", "--batch", "8", "--steps", "3", "--freeze", "none", "--threads", "2",
                                "--image", "224", "--text_len", "40"]
    for setting in ("--random_init_towers=true", "--data=random", "--dtype=float32", "--max_text_len=40",
                    "--micro_batch_size=8", "--image_size=224", "--steps=3"):
        assert setting in ours_command
    assert figures == {"original none": [1.5, 1.0], "ours none": [3.0, 2.0], "original both": [2.5, 2.0],
                       "ours both": [4.0, 4.0], "ours none+shared": [5.0, 6.0]}
    printed = capsys.readouterr().out
    assert "original none          1.50, 1.00" in printed and "median 1.25  min-max 1.00-1.50" in printed
    assert "ours none+shared       5.00, 6.00" in printed and "median 5.50  min-max 5.00-6.00" in printed
    saved = json.loads((tmp_path / "side.json").read_text())
    assert [r["label"] for r in saved["runs"][:3]] == ["original none", "ours none", "original both"]
    assert saved["figures"] == figures


def test_refuses_an_unknown_freeze_value():
    with pytest.raises(SystemExit):
        bench_vs_original.parse_args(["--peer_dir=a", "--peer_site=b", "--freeze=all"])
