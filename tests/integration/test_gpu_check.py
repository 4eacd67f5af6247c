"""benchmarks/gpu_check.sh --cpu-only: the GPU check's every part on the CPU at CI size (a real
local Ray, MLflow on sqlite), and its JSON with every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

TOP = {"benchmark", "cpu_only", "machine", "settings", "dataset", "data", "train", "model",
       "not_measured", "wall_s", "budget_s"}
DATA = {"cpu_bare_decode_img_s_per_core", "cpu_train_transform_img_s_per_core",
        "cpu_train_transform_vs_bare_decode", "cpu_path", "gpu_path", "goals"}
LOADER_RUN = {"workers", "img_s", "cpu_cores_used", "images", "wall_s"}
MODEL = {"batch_size", "image_size", "precision", "channels_last", "optimizer", "peak_tflops",
         "mfu_formula", "results", "mfu_relative_to_resnet50", "compile_faster", "goals"}
MODEL_RESULT = {"model", "forward_gmacs", "params_m", "eager", "compile"}
TIMING = {"img_per_s", "step_ms_median", "step_ms_min", "achieved_tflops", "mfu_vs_spec",
          "mfu_vs_bf16_matmul"}
TRAIN = {"command", "exit_code", "finished", "wall_s", "decode", "checkpoints", "mlflow_run_id",
         "registered_model", "mlflow_status", "mlflow_metrics", "val_top1_by_epoch",
         "train_img_per_s", "top1_training_validation", "top1_registered_model_on_cpu",
         "eval_images", "top1_equal", "eval_exit_code"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-only"],
                          cwd=tmp_path_factory.mktemp("cwd"), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_json_has_every_field(report):
    assert set(report) == TOP
    assert report["cpu_only"] is True and report["benchmark"] == "gpu_check"
    assert set(report["data"]) == DATA
    assert set(report["data"]["cpu_path"]) == LOADER_RUN
    assert [set(r) for r in report["data"]["gpu_path"]] == [LOADER_RUN | {"device"}]
    assert set(report["data"]["goals"]) == {"gpu_img_s_per_gpu", "cpu_transform_vs_bare_decode"}
    assert set(report["model"]) == MODEL
    assert list(report["model"]["results"]) == ["resnet50", "attention56", "attention92"]
    for result in report["model"]["results"].values():
        assert set(result) - {"bf16_matmul_tflops"} == MODEL_RESULT
        assert set(result["eager"]) == TIMING
    assert set(report["model"]["goals"]) == {"attention56_mfu_vs_resnet50", "attention92_mfu_vs_resnet50"}
    assert set(report["train"]) == TRAIN


def test_the_data_part_ran_both_paths_on_the_same_shards(report):
    data, cores = report["data"], report["machine"]["cpu_cores"]
    assert report["dataset"]["train"] == 96 and report["dataset"]["val"] == 32
    assert 30 < report["dataset"]["mean_kb"] < 200  # ImageNet-like JPEGs, not flat colour
    assert data["cpu_bare_decode_img_s_per_core"] > 0 and data["cpu_train_transform_img_s_per_core"] > 0
    # Two timed epochs of 96 // 32 = 3 batches of 32 after a warm-up epoch, on either path.
    assert data["cpu_path"]["workers"] == cores and data["cpu_path"]["images"] == 192
    assert [(r["device"], r["workers"], r["images"]) for r in data["gpu_path"]] == [("cpu", 1, 192)]
    gpu_goal = data["goals"]["gpu_img_s_per_gpu"]
    assert (gpu_goal["goal"], gpu_goal["max_cpu_cores"], gpu_goal["met"]) == (2500, 4, None)


def test_the_model_part_timed_every_model_and_left_the_gpu_figures_open(report):
    model = report["model"]
    assert (model["batch_size"], model["image_size"]) == (2, 64)
    gmacs = {name: r["forward_gmacs"] for name, r in model["results"].items()}
    # torchvision's 4.11 GMACs and the README's 6.27 / 10.53 at 224 px, scaled to 64 px.
    assert gmacs == pytest.approx({"resnet50": 4.11 * (64 / 224) ** 2, "attention56": 6.27 * (64 / 224) ** 2,
                                   "attention92": 10.53 * (64 / 224) ** 2}, rel=0.03)
    for result in model["results"].values():
        assert result["eager"]["img_per_s"] > 0 and result["compile"] is None
        assert result["eager"]["mfu_vs_spec"] is None
    assert model["peak_tflops"]["spec_bf16_dense"] is None
    assert model["mfu_relative_to_resnet50"]["attention56"]["compile"] is None
    assert model["mfu_relative_to_resnet50"]["attention92"]["best_vs_best"] > 0
    assert model["goals"]["attention56_mfu_vs_resnet50"]["met"] is None
    assert report["not_measured"] and "cpu-only" in report["not_measured"][0]


def test_ran_train_finished_checkpointed_logged_and_the_registered_model_evaluates_the_same(report):
    train = report["train"]
    assert (train["exit_code"], train["finished"]) == (0, True)
    # 96 samples at batch 16: 6 steps an epoch, a checkpoint after each of the 2 epochs.
    assert train["checkpoints"] == ["epoch=0001_step=0000006", "epoch=0002_step=0000012"]
    assert train["mlflow_status"] == "FINISHED" and len(train["mlflow_run_id"]) == 32
    assert {"train_loss", "val_top1", "img_per_s"} <= set(train["mlflow_metrics"])
    assert train["registered_model"] == "models:/gpu-check-attention56/1"
    assert len(train["val_top1_by_epoch"]) == 2
    assert (train["eval_exit_code"], train["eval_images"]) == (0, 32)
    assert train["top1_registered_model_on_cpu"] == pytest.approx(train["top1_training_validation"], abs=1e-4)
    assert train["top1_equal"] is True
