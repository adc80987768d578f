"""benchmarks/gpu.sh's pieces (benchmarks/gpu/*.py), checked without a GPU: FlexGen's published policies in
each side's spelling, the truncated model and its cap, the tokenizer stand-in flexgen pads with, how runs are
recorded, and the tables the lead pastes. The whole script runs on a CPU with GPU_SH_SMALL=1 (slow test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks" / "gpu"), str(ROOT / "benchmarks")]

import accelerate_run  # noqa: E402
import gpu_table  # noqa: E402
import models  # noqa: E402
import policies  # noqa: E402
import record  # noqa: E402

GIB = 2**30


def test_the_30b_policy_reads_the_same_for_flexrun_and_flexgen() -> None:
    p = policies.policy("opt-30b-8of48", "fp16")  # a truncated model takes its full model's policy
    assert (p.percent, p.gpu_batch_size, p.num_gpu_batches, p.cpu_cache_compute) == (
        (20, 80, 0, 100, 0, 100),
        48,
        3,
        True,
    )
    fr = policies.flexrun_args(p, ["--cpu-cache-compute", "on"])
    assert fr == [
        "--placement", "manual", "--weights", "device=20,host=80", "--cache", "host=100", "--activations", "host=100",
        "--gpu-batch-size", "48", "--num-gpu-batches", "3", "--overlap", "--compress-weight", "none",
        "--compress-cache", "none", "--cpu-cache-compute", "on",
    ]  # fmt: skip
    fg = policies.flexgen_args("opt-30b-8of48", p, 512, 32, "/o", "/l")
    assert fg[:4] == ["--model", "facebook/opt-30b", "--path", "_DUMMY_"]
    assert " ".join(fg[4:11]) == "--percent 20 80 0 100 0 100" and "--cpu-cache-compute" in fg
    assert "--debug-mode" not in fg  # every step runs, none is projected


def test_the_compressed_policies_ask_for_flexgens_int4_groups_of_64() -> None:
    p = policies.policy("opt-6.7b", "comp")
    fr = policies.flexrun_args(p, [])
    assert fr[fr.index("--compress-weight") + 1 : fr.index("--compress-weight") + 4] == ["int4", "--group-size", "64"]
    assert fr[fr.index("--compress-cache") + 1] == "int4" and "--no-overlap" in fr
    fg = policies.flexgen_args("opt-6.7b", p, 512, 32, "/o", "/l")
    assert {"--compress-weight", "--compress-cache"} <= set(fg) and fg[fg.index("--overlap") + 1] == "False"
    with pytest.raises(SystemExit, match="no published FlexGen policy"):
        policies.policy("opt-13b", "fp16")


def test_flexruns_bench_takes_host_side_attention() -> None:
    # gpu.sh passes FlexGen's --cpu-cache-compute on; without the option it would say the runs differ.
    assert policies.cpu_cache_compute_flag() in (["--cpu-cache-compute"], ["--cpu-cache-compute", "on"])


def test_a_truncated_30b_keeps_every_dim_but_depth_and_the_whole_models_gpu_headroom(tmp_path: Path) -> None:
    name, cfg, full = models.write_config(tmp_path, "opt-30b", 8)
    whole = json.loads(json.dumps(models.hf_config("opt-30b", "float16").to_dict()))
    saved = json.loads((tmp_path / name / "config.json").read_text())
    assert (name, full, saved["num_hidden_layers"]) == ("opt-30b-8of48", 48, 8)
    for key in ("hidden_size", "ffn_dim", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        assert saved[key] == whole[key]
    # 16 GiB less the policy's 20% GPU share of the 40 layers left out (OPT-30B's layer: 1.233 GB in fp16).
    per_layer = models.layer_bytes(cfg)
    assert 1.23e9 < per_layer < 1.24e9
    assert models.device_cap(cfg, "opt-30b", full, 16) == 16 * GIB - int(40 * 0.2 * per_layer)
    assert models.device_cap(cfg, "opt-30b", full, 16, "comp") == 16 * GIB  # that policy keeps no weights there
    assert models.device_cap(models.hf_config("opt-6.7b", "float16"), "opt-6.7b", 32, 16) == 16 * GIB


def test_the_tokenizer_stand_in_pads_like_opts(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    models.write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, padding_side="left")
    ids = tok(["Paris is the capital city of"], padding="max_length", max_length=24).input_ids[0]
    assert (tok.pad_token_id, tok.eos_token_id) == (1, 2)  # OPT's, which flexgen's masks assume
    first = ids.index(2)
    assert len(ids) == 24 and set(ids[:first]) == {1} and max(ids) < 50272 and len(ids) - first > 2


def test_accelerates_best_batch_leaves_two_layers_on_the_gpu() -> None:
    cfg = models.hf_config("opt-6.7b", "float16")
    b = accelerate_run.best_batch(cfg, 16 * GIB, 544, 2 * GIB)
    room = 16 * GIB - 2 * GIB - 2 * accelerate_run.layer_bytes(cfg)
    assert accelerate_run.kv_cache_bytes(cfg, b, 544) <= room < accelerate_run.kv_cache_bytes(cfg, 2 * b, 544)


def _line(case: str, side: str, policy: str, tok: float, **kw: object) -> str:
    return json.dumps({"case": case, "side": side, "policy": policy, "total_tok_s": tok, "decode_tok_s": tok,
                       "prefill_s": 1.0, "gpu_peak_bytes": 8 * GIB, "gpu_cap_bytes": 16 * GIB, "batch": 4, **kw})  # fmt: skip


def test_the_table_takes_medians_and_the_ratios_the_targets_are_stated_in(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs.jsonl"
    lines = [_line("m", "flexrun", "fp16", t) for t in (10.0, 30.0, 20.0)]
    lines += [_line("m", "flexgen", "fp16", t) for t in (10.0, 5.0)] + [_line("m", "flexrun", "own", 40.0)]
    lines += [_line("m", "accelerate", "b=8", 2.0), _line("m", "accelerate", "b=16", 4.0)]
    lines.append(json.dumps({"case": "m", "side": "flexgen", "policy": "fp16", "failed": "exit 1: CUDA out of memory"}))
    lines.append(_line("m", "flexrun", "comp-nocap", 100.0))  # refused at the cap: not in flexrun's best
    lines.append(_line("m", "flexgen", "comp", 50.0))
    runs.write_text("\n".join(lines) + "\n")
    sys.argv = ["gpu_table.py", str(runs)]
    gpu_table.main()
    out = capsys.readouterr().out
    assert "| m | flexrun, FlexGen's policy (fp16) | 4 | 3 | 20.00 (10.00, 30.00, 20.00) |" in out
    assert "| m | flexgen, FlexGen's policy (fp16) | 4 | 2 (+1 failed) | 7.50 (10.00, 5.00) |" in out
    assert "both on FlexGen's fp16 policy | **2.67x** |" in out  # 20 / 7.5: the failed run is not counted
    assert "own plan / flexgen's best published policy | **0.80x** |" in out  # 40 / 50 (comp)
    assert "accelerate at its best batch (b=16) | **10.00x** |" in out  # flexrun's best (40) / 4
    assert "- failed: m, flexgen, FlexGen's policy (fp16): exit 1: CUDA out of memory" in out
    assert "| m | flexrun / flexgen, both on FlexGen's comp policy | - |" in out
    assert "cap lifted / flexgen under it, FlexGen's comp policy (not like for like) | **2.00x** |" in out


def test_a_run_is_recorded_from_its_last_json_line_or_as_failed(tmp_path: Path) -> None:
    out, err, peak, runs = (tmp_path / n for n in ("out", "err", "peak.json", "runs.jsonl"))
    out.write_text('init weight...\n{"not": "this"}\n{"total_tok_s": 3.5, "side": "flexgen"}\nbye\n')
    err.write_text("warning\n\n")
    peak.write_text(json.dumps({"gpu_peak_bytes": 5, "gpu_cap_bytes": 9}))
    record_main = record.main
    sys.argv = ["record.py", str(runs), "m", "flexgen", "fp16", "0", str(out), str(err), str(peak)]
    record_main()
    err.write_text("Traceback...\ntorch.OutOfMemoryError: CUDA out of memory\n")
    sys.argv[5] = "1"
    record_main()
    first, second = (json.loads(x) for x in runs.read_text().splitlines())
    assert first == {"total_tok_s": 3.5, "side": "flexgen", "gpu_peak_bytes": 5, "gpu_cap_bytes": 9, "case": "m",
                     "policy": "fp16"}  # fmt: skip
    assert second["failed"] == "exit 1: torch.OutOfMemoryError: CUDA out of memory" and "total_tok_s" not in second


@pytest.mark.slow
def test_gpu_sh_runs_end_to_end_on_a_cpu(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """GPU_SH_SMALL=1, two rounds: every side on a tiny OPT shape (flexgen's dry run needs prepare.sh's .whl).
    The interpreter it is given refuses the fp16 policy's flexrun runs as flexrun's ledger refuses a placement
    over the device budget, so the cap-lifted rerun runs too, and in round 2 alone."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("gpu.sh's CPU dry run takes minutes: run with -m slow")
    if not list((ROOT / ".whl").glob("flexgen-*.whl")):
        pytest.skip("no .whl/flexgen wheel here: run benchmarks/gpu/prepare.sh")
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do if [[ $a == device=20,host=80 ]]; then\n'
        '  echo "flexrun: placement does not fit: the device tier needs about 14.2 GiB but its budget is 6.8 GiB" >&2\n'
        "  exit 1; fi; done\n"
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    env = {**os.environ, "GPU_SH_SMALL": "1", "GPU_SH_REPEAT": "2", "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "FLEXRUN_CACHE_DIR": str(tmp_path / "cache"), "PYTHON": str(python)}  # fmt: skip
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("flexgen dry run: exit 0") == 4  # both policies, both rounds
    runs = [json.loads(x) for x in next((tmp_path / "out").glob("gpu-*.jsonl")).read_text().splitlines()]
    ok = [(r["side"], r["policy"]) for r in runs if "failed" not in r]
    failed = [(r["side"], r["policy"]) for r in runs if "failed" in r]
    assert sorted(ok) == [("accelerate", "b=2"), ("flexrun", "comp"), ("flexrun", "comp"), ("flexrun", "own"),
                          ("flexrun", "own")]  # fmt: skip
    assert failed == [("flexrun", "fp16"), ("flexrun", "fp16-nocap"), ("flexrun", "fp16-nocap")]
    assert "| tiny | flexrun's best / accelerate at its best batch (b=2) |" in proc.stdout


def test_flexgen_runs_offline_as_far_as_it_goes_without_a_gpu(tmp_path: Path) -> None:
    """flexgen 0.1.8 from prepare.sh's wheel, on this torch and transformers: its own argument parser, the
    tokenizer stand-in in place of the hub's, the model directory's dims, its Policy."""
    wheels = list((ROOT / ".whl").glob("flexgen-*.whl"))
    if not wheels:
        pytest.skip("no .whl/flexgen wheel here: run benchmarks/gpu/prepare.sh")
    site = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--target",
        str(site),
        str(wheels[0]),
    ]
    subprocess.run(pip, check=True, capture_output=True)
    models.write_tokenizer(tmp_path / "tok")
    name, _, _ = models.write_config(tmp_path, "opt-30b", 2)
    args = policies.flexgen_args(name, policies.policy(name, "fp16"), 64, 4, str(tmp_path / "o"), str(tmp_path / "l"))
    script = ROOT / "benchmarks" / "gpu" / "flexgen_run.py"
    cmd = [sys.executable, str(script), "--config-dir", str(tmp_path / name), "--tokenizer", str(tmp_path / "tok")]
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([*cmd, "--dry-run", "--", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (run["tokenizer_asked"], run["pad_token_id"], run["layers"], run["batch"]) == ("facebook/opt-30b", 1, 2, 144)
    assert "w_gpu_percent=20, w_cpu_percent=80" in run["policy"] and "cpu_cache_compute=True" in run["policy"]
    # flexgen's byte counts from the same dims: 2 layers of OPT-30B plus its embeddings; a 144 x 68 cache.
    assert run["cache_bytes"] == 2 * 144 * 68 * 2 * 7168 * 2
