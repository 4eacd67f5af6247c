"""``ran bench`` on the CPU (issue 25): every setting a CPU has, valid JSON with every field, the
variants' losses agree after 20 steps, the fastest setting is a --set line ``ran train``
accepts, the step table records it for ``auto``, and a CUDA graph is one error before work."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from ran import runtime
from ran.bench import CHECK_STEPS, TOLERANCE, native_precisions, variants
from ran.cli import main
from ran.config import ConfigError, load_config

ROW = {"model", "variant", "precision", "compile", "cuda_graph", "batch_size", "img_per_s",
       "ms_per_step", "mfu", "peak_mem_mb", "compile_s", "loss_20", "loss_reference",
       "loss_rel_diff", "loss_ok", "error"}
REPORT = {"device", "torch", "job", "model", "crop", "num_classes", "peak_tflops", "peak_dtype",
          "rows", "fastest", "relative_to_baseline", "layout", "data", "profile", "step_table"}


@pytest.fixture(scope="module")
def job(synth_data, tiny_job, tmp_path_factory) -> Path:
    """The tiny job's model made smaller still (no units around the trunk, one trunk unit), at
    batch 4: compiling it on 2 cores takes about a minute."""
    path = tmp_path_factory.mktemp("bench") / "tiny.yaml"
    cfg = tiny_job(synth_data, tmp_path_factory.mktemp("runs"), **{
        "model.p": 0, "model.t": 1, "data.batch_size": 4, "data.workers": 1})
    path.write_text(cfg.to_yaml())
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """RAN_CACHE_DIR of these tests: the step table and inductor's cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def compiled(job, cache):
    """fp32 eager and compiled, no baseline: the one compile of the suite."""
    return _main(cache, str(job), "--precision", "fp32", "--modes", "eager,default", "--baseline",
                 "none", "--steps", "3", "--json")


@pytest.fixture(scope="module")
def every_precision(job, cache):
    """fp32, bf16 and fp16 eager, with the loader timed (--data)."""
    return _main(cache, str(job), "--precision", "fp32,bf16,fp16", "--modes", "eager",
                 "--baseline", "none", "--steps", "2", "--data", "--data-steps", "4",
                 "--json")


@pytest.fixture(scope="module")
def beside_resnet(job, cache):
    """fp32 eager beside torchvision's ResNet-18, not recorded in the step table."""
    return _main(cache, str(job), "--precision", "fp32", "--modes", "eager", "--baseline",
                 "resnet18", "--steps", "3", "--no-save", "--json")


def _main(cache: Path, *argv: str) -> tuple[int, dict]:
    mp = pytest.MonkeyPatch()
    cap = _Capture()
    try:
        mp.setenv("RAN_CACHE_DIR", str(cache))
        with cap:
            code = main(["bench", *argv])
    finally:
        mp.undo()
    return code, json.loads(cap.text)


class _Capture:
    """stdout of an in-process ``ran`` command (module-scoped fixtures have no capsys)."""

    def __enter__(self):
        import contextlib
        import io

        self.buffer = io.StringIO()
        self._cm = contextlib.redirect_stdout(self.buffer)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        self.text = self.buffer.getvalue()


def test_the_default_variants_are_every_setting_this_cpu_has():
    cpu = torch.device("cpu")
    found = {(v.precision, v.compile, v.cuda_graph) for v in variants(cpu)}
    assert found == {(p, c, False) for p in native_precisions(cpu) for c in ("off", "default")}
    assert native_precisions(cpu)[0] == "fp32"
    assert ("bf16" in native_precisions(cpu)) == runtime.native_bf16(cpu)


def test_compiled_and_eager_agree_and_the_report_has_every_field(compiled, job):
    code, report = compiled
    assert code == 0
    assert set(report) == REPORT
    assert report["model"] == "attention56/cifar" and report["crop"] == 16
    assert report["num_classes"] == 4 and report["peak_tflops"] > 0
    rows = report["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("attention56", "fp32 eager"), ("attention56", "fp32 compile=default")]
    for row in rows:
        assert set(row) == ROW and row["error"] is None
        assert row["img_per_s"] > 0 and row["ms_per_step"] > 0 and 0 < row["mfu"] < 1
        assert row["peak_mem_mb"] is not None and row["compile_s"] >= 0
    eager, comp = rows
    # The compiled step's loss after 20 steps from the same weights on the same batches.
    assert comp["loss_reference"] == "fp32 eager" and comp["loss_ok"] is True
    assert comp["loss_20"] == pytest.approx(eager["loss_20"], rel=TOLERANCE["fp32"])  # the mean
    assert comp["compile_s"] > eager["compile_s"]  # the first compiled step compiles
    assert report["layout"]["detours"] == {} and report["layout"]["activations"] > 100
    assert report["relative_to_baseline"] == {} and report["profile"] is None  # not asked


def test_the_fastest_setting_is_a_set_line_ran_train_accepts(compiled, job):
    _, report = compiled
    fastest = report["fastest"]
    best = max(report["rows"], key=lambda r: r["img_per_s"])
    assert fastest["variant"] == best["variant"]
    argv = shlex.split(fastest["set"])
    assert argv[::2] == ["--set"] * 4
    cfg = load_config(job, argv[1::2])
    assert (cfg.train.precision, cfg.train.compile, cfg.train.cuda_graph, cfg.data.batch_size) == (
        best["precision"], best["compile"], False, 4)


def test_the_step_table_records_the_fastest_for_auto(compiled, cache):
    _, report = compiled
    table = json.loads((cache / "step_table.json").read_text())
    entry = table[report["device"]]["attention56/cifar"]
    assert report["step_table"] == str(cache / "step_table.json")
    assert (entry["precision"], entry["compile"], entry["batch_size"]) == (
        report["fastest"]["precision"], report["fastest"]["compile"], 4)
    assert entry["by"] == "ran bench"


def test_fp16_and_bf16_agree_with_fp32_and_the_loader_is_timed(every_precision):
    code, report = every_precision
    assert code == 0
    rows = {r["precision"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "bf16", "fp16"]
    for precision, row in rows.items():
        assert row["error"] is None and row["img_per_s"] > 0
        assert row["loss_ok"] is True, (precision, row["loss_20"], row["loss_rel_diff"])
        if precision != "fp32":
            assert row["loss_reference"] == "fp32 eager"
            assert 0 < row["loss_rel_diff"] <= TOLERANCE[precision]  # not bitwise: another precision
    data = report["data"]
    assert data["setting"] == report["fastest"]["variant"] and data["batch_size"] == 4
    assert data["loader_img_per_s"] > 0 and data["fed_img_per_s"] > 0
    assert data["fed_over_synthetic"] == pytest.approx(
        data["fed_img_per_s"] / data["synthetic_img_per_s"], abs=2e-3)


def test_the_baseline_runs_the_same_settings_and_mfu_is_relative_to_it(beside_resnet, cache):
    code, report = beside_resnet
    assert code == 0 and report["step_table"] is None  # --no-save
    mine, theirs = report["rows"]
    assert (mine["model"], theirs["model"]) == ("attention56", "resnet18")
    assert mine["variant"] == theirs["variant"] == "fp32 eager"
    rel = report["relative_to_baseline"]
    assert rel["baseline"] == "resnet18"
    assert rel["mfu_best_over_best"] == pytest.approx(mine["mfu"] / theirs["mfu"], abs=2e-3)
    assert rel["mfu_by_setting"] == {"fp32 eager b4": rel["mfu_best_over_best"]}


def test_a_cuda_graph_on_this_cpu_is_one_line_before_any_work(job, capsys):
    code = main(["bench", str(job), "--set", "train.cuda_graph=true", "--set", "scaling.use_gpu=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("error: train.cuda_graph=true needs a CUDA GPU, and this step runs on cpu; set "
                   "train.cuda_graph=false (on a CPU, train.compile=default removes most of the "
                   "launch overhead)\n")
    code = main(["bench", str(job), "--modes", "eager,cuda_graph"])
    assert code == 2
    assert capsys.readouterr().err == ("error: --modes cuda_graph: CUDA graphs need a CUDA GPU and "
                                       "this machine has none; leave cuda_graph out\n")


def test_check_steps_is_the_issue_s_twenty():
    assert CHECK_STEPS == 20
    with pytest.raises(ConfigError, match="unknown mode"):
        variants(torch.device("cpu"), modes=["fastest"])
