"""`dynprune bench serve-generate` end to end on the tiny gated Llama (slow: three server processes)."""

from __future__ import annotations

import json

import pytest

from dynprune.serve.bench_generate import main, prompts


def test_prompts_are_held_out_sentences_of_varied_length():
    from dynprune.assets import kjv_books

    got = prompts(40)
    test_text = " ".join(text for _, text in kjv_books("test"))
    assert len(got) == 40 and all(p in test_text for p in got)
    assert len({len(p.split()) for p in got}) > 5  # lengths differ: batches need left padding


@pytest.mark.parametrize(
    ("option", "value"),
    [("--requests", "0"), ("--max-new-tokens", "-1"), ("--budget", "1.5"), ("--budget", "0")],
)
def test_bad_options_stop_before_any_server_starts(tmp_path, option, value):
    with pytest.raises(SystemExit, match=option):
        main([option, value, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_generation_load_finds_no_lost_or_wrong_answers_and_overload_gets_429(tiny_lm_checkpoint, tmp_path):
    out = tmp_path / "bench"
    argv = ["--checkpoint", str(tiny_lm_checkpoint), "--burst", "24", "--requests", "8", "--rounds", "1"]
    argv += ["--overload", "40", "--concurrency", "4", "--max-batch", "4", "--max-new-tokens", "6"]
    argv += ["--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "bench_generate.json").read_text())
    assert report["lost"] == 0 and report["wrong"] == {"tokens": 0, "flops": 0}
    assert report["checked"] >= 24 + 6 * 8
    assert report["burst"]["statuses"] == {"200": 24} and report["burst"]["max_batch_seen"] > 1
    statuses = report["overload"]["statuses"]
    assert set(statuses) <= {"200", "429"} and statuses.get("429", 0) > 0
    assert report["overload"]["all_429_have_retry_after"]
    assert report["exit_codes"] == {"batching on": 0, "batching off": 0, "overload": 0}
    rows = {(r["server"], r["variant"]): r for r in report["closed_loop"]}
    assert set(rows) == {
        (s, v) for s in ("batching on", "batching off") for v in ("gated 0.6", "dense", "mixed")
    }
    assert rows[("batching on", "dense")]["mean_flops_ratio"] == 1.0
    assert rows[("batching on", "gated 0.6")]["mean_flops_ratio"] <= 0.6 + 1e-9
    assert rows[("batching off", "dense")]["mean_batch"] == 1.0
    text = (out / "bench_generate.md").read_text()
    assert "gated0.6_over_dense_tokens_per_s (batching on)" in text
    with pytest.raises(SystemExit, match="exists"):
        main(argv)  # never overwrites results silently


def _processes_mentioning(text: str) -> list[int]:
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return found


def test_servers_already_started_are_stopped_when_a_later_one_cannot_start(tiny_lm_checkpoint, tmp_path):
    from dynprune.serve.loadgen import start_servers

    source = ["--checkpoint", str(tiny_lm_checkpoint), "--seed", "7321"]  # a mark to find it by
    specs = {
        "first": (source, tmp_path / "first.log", []),
        "second": (source, tmp_path / "no-such-dir" / "second.log", []),  # its log cannot be opened
    }
    with pytest.raises(FileNotFoundError):
        start_servers(specs)
    assert (tmp_path / "first.log").exists()  # the first one did start
    assert _processes_mentioning("--seed\x007321") == []
