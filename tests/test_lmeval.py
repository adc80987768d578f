"""``flexrun eval`` against lm-evaluation-harness's own ``hf`` backend, offline, on the same tiny random OPT:
a local multiple-choice task, a perplexity task and a generation task (JSON files, ``dataset_path: json``,
``--include_path``) give the same per-sample log-likelihoods (within 1e-4, float32), the same generations and
the same metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run
from tests.hf_reference import OptCheckpoint

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "the quick brown fox", "choices": [" jumps", " sleeps", " over the lazy dog", " hello"], "answer": 0},
    {"question": "hello world, this is", "choices": [" the end", " a story", " numbers", " café"], "answer": 1},
    {"question": "a small café in Zürich serves", "choices": [" crème brûlée", " more words", " 1 2 3"], "answer": 0},
]
# Long enough for two windows of the model's 64 positions.
TEXTS = [{"text": "the quick brown fox jumps over the lazy dog. " * 8}, {"text": "numbers: 1 2 3 4 5 and more"}]
TASKS = {
    "tiny_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
    "tiny_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    },
    "tiny_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["."], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    },
}


def _task_dir(tmp_path: Path) -> Path:
    """The three tasks, each from a local JSON lines file."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
    for name, spec in TASKS.items():
        data = tmp_path / ("texts.jsonl" if name == "tiny_ppl" else "questions.jsonl")
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
        task |= {"test_split": "test", **spec}
        (tasks / f"{name}.yaml").write_text(json.dumps(task))  # YAML reads JSON
    return tasks


def _samples(out: Path, task: str) -> list[dict[str, Any]]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_flexrun_eval_equals_the_hf_backend(
    job_ckpt: OptCheckpoint, stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _task_dir(tmp_path)
    names = sorted(TASKS)
    out = tmp_path / "out"
    model_args = f"pretrained={job_ckpt.path},store_dir={stores},offload_dir={tmp_path / 'off'},placement=manual"
    result = run(
        "eval", "--model_args", model_args, "--batch_size", "2", "--tasks", ",".join(names),
        "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (results_file,) = out.rglob("results_*.json")
    ours = json.loads(results_file.read_text())

    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={job_ckpt.path},dtype=float32",
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=2,
        log_samples=True,
    )
    assert ours["config"]["model"] == "flexrun"
    for task in names:
        mine, theirs = _samples(out, task), hf["samples"][task]
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, sorted(theirs, key=lambda s: s["doc_id"]), strict=True):
            if task == "tiny_gen":
                assert a["filtered_resps"] == b["filtered_resps"]
                continue
            got, want = a["filtered_resps"], b["filtered_resps"]
            flat = [(float(x[0]), x[1]) if isinstance(x, list) else (float(x), None) for x in got]
            ref = [(float(x[0]), x[1]) if isinstance(x, (list, tuple)) else (float(x), None) for x in want]
            assert [str(g) for _, g in flat] == [str(g) for _, g in ref]  # the samples file holds "True"/"False"
            assert [v for v, _ in flat] == pytest.approx([v for v, _ in ref], abs=1e-4)
        for metric, value in hf["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_flexrun_eval_without_lm_eval_options_is_lm_evals_error(job_ckpt: OptCheckpoint) -> None:
    result = run("eval", "--model_args", f"pretrained={job_ckpt.path}", "--no-such-option")
    assert result.exit_code == 2
