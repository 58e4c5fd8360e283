"""bench/compare_mlx_lm.py --from-json: one table over runs made in separate processes."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare_mlx_lm  # noqa: E402


def _side(prefill_s: float, decode_tok_s: float, peak_gb: float) -> dict:
    return {
        "decode_weight_bytes": 2e9,
        "prompt": {"512": {"prefill_s": [prefill_s, prefill_s * 3, prefill_s], "ttft_s": [prefill_s * 1.1] * 3}},
        "decode_tok_s": [decode_tok_s] * 3,
        "peak_memory_bytes": peak_gb * 1e9,
    }


def _run(path: Path, model: str, ours: dict, theirs: dict, bandwidth_gbs: float = 3350) -> Path:
    environment = {"date": "2026-11-24", "device": "gpu", "device_info": {"device_name": "H100"}, "mlx": "0.32.4",
                   "mlx_lm": "0.32.2", "mlx_gemma4_commit": "abc1234", "bandwidth_gbs": bandwidth_gbs}
    args = {"trials": 3, "gen_tokens": 128, "decode_prompt_length": 512}
    result = {"model": model, "quant": "bf16", "weights": "in memory", "prompt_lengths": [512],
              "mlx_gemma4": ours, "mlx_lm": theirs}
    path.write_text(json.dumps({"environment": environment, "args": args, "results": [result]}))
    return path


def test_runs_from_separate_processes_make_one_table_of_their_medians(tmp_path, capsys):
    first = _run(tmp_path / "a.json", "e2b", _side(0.010, 300.0, 9.5), _side(0.020, 100.0, 9.6))
    second = _run(tmp_path / "b.json", "31b", _side(0.100, 80.0, 20.8), _side(0.250, 40.0, 23.0))
    compare_mlx_lm.main(["--from-json", str(first), str(second)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| e2b", "| 31b"))]
    assert rows == [
        "| e2b | bf16 | 512 | 51,200 | 25,600 | 2.00 | 11.0 / 22.0 | 300.0 | 100.0 | 3.00 | 9.50 / 9.60 "
        "| 600.0 / 200.0 | 17.9 / 6.0 |",
        "| 31b | bf16 | 512 | 5,120 | 2,048 | 2.50 | 110.0 / 275.0 | 80.0 | 40.0 | 2.00 | 20.80 / 23.00 "
        "| 160.0 / 80.0 | 4.8 / 2.4 |",
    ]


def test_runs_of_different_rooflines_are_refused(tmp_path):
    first = _run(tmp_path / "a.json", "e2b", _side(0.01, 300.0, 9.5), _side(0.02, 100.0, 9.6))
    second = _run(tmp_path / "b.json", "e2b", _side(0.01, 300.0, 9.5), _side(0.02, 100.0, 9.6), bandwidth_gbs=4800)
    with pytest.raises(SystemExit, match="different roofline bandwidths"):
        compare_mlx_lm.main(["--from-json", str(first), str(second)])


def _quantized_bits(model) -> dict[str, int]:
    return {path: module.bits for path, module in model.named_modules() if hasattr(module, "bits")}


def test_mlx_lm_recipe_ours_gives_mlx_lm_our_converters_per_layer_bits():
    from configs import MODELS

    own = _quantized_bits(compare_mlx_lm.build_mlx_lm(MODELS["e2b-mini"], 0, "4bit", "own"))
    ours = _quantized_bits(compare_mlx_lm.build_mlx_lm(MODELS["e2b-mini"], 0, "4bit", "ours", sensitive_bits=8,
                                                       ple_table_bits=6))
    assert own.keys() == ours.keys()
    assert set(own.values()) == {4}
    eight = {path for path, bits in ours.items() if bits == 8}
    assert "model.per_layer_model_projection" in eight
    assert eight == {path for path in ours if "per_layer" in path} - {"model.embed_tokens_per_layer"}  # its projections
    assert ours["model.embed_tokens_per_layer"] == 6
    assert ours["model.embed_tokens"] == ours["model.layers.0.mlp.down_proj"] == 4


def test_the_table_names_a_quantization_unlike_the_default(tmp_path, capsys):
    run = _run(tmp_path / "a.json", "e2b", _side(0.010, 300.0, 9.5), _side(0.020, 100.0, 9.6))
    report = json.loads(run.read_text())
    report["results"][0].update(quant="4bit", sensitive_bits=4, ple_table_bits=4, mlx_lm_recipe="ours")
    report["results"].append(dict(report["results"][0], sensitive_bits=8, ple_table_bits=5, mlx_lm_recipe="own"))
    # A run before session 36 recorded no table bits: its table was at the sensitive bits.
    report["results"].append({k: v for k, v in report["results"][1].items() if k != "ple_table_bits"})
    run.write_text(json.dumps(report))
    compare_mlx_lm.main(["--from-json", str(run)])
    table = capsys.readouterr().out
    assert "| e2b | 4bit s4 t4 same bits | 512 |" in table
    assert "| e2b | 4bit | 512 |" in table and "| e2b | 4bit t8 | 512 |" in table
