"""`clora bench sampler`: the table it prints, its input checks, and one tiny-model run on real vLLM."""

from __future__ import annotations

import pytest

from clora.bench.sampler import SamplerBenchRow, format_rows, main


def test_ratio_is_vllm_time_over_this_time():
    rows = [
        SamplerBenchRow("clora-grouped", "1 adapter", 4, 40, 2.0, 20.0),
        SamplerBenchRow("vllm", "1 adapter", 4, 40, 8.0, 5.0),
    ]
    table = format_rows(rows).splitlines()
    assert table[2].endswith("| 4.00 |") and table[2].startswith("| clora-grouped | 1 adapter |")
    assert table[3].endswith("| 1.00 |")


def test_bad_sizes_are_refused_with_the_option_named(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--adapters", "0"])
    assert exc.value.code == 2
    assert "--adapters must be >= 1" in capsys.readouterr().err


@pytest.mark.vllm
def test_quick_run_prints_both_op_sets_for_every_case(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert main(["--size", "quick"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| clora") or line.startswith("| vllm")]
    cases = {(line.split("|")[1].strip(), line.split("|")[2].strip()) for line in lines}
    assert cases == {(ops, case) for ops in ("clora-grouped", "vllm") for case in ("base", "1 adapter", "2 adapters")}
    for line in lines:
        tokens, seconds = int(line.split("|")[4]), float(line.split("|")[5])
        assert tokens > 0 and seconds > 0
