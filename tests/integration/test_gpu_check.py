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

TOP = {"benchmark", "cpu_only", "machine", "settings", "dataset", "data", "train", "bench",
       "not_measured", "wall_s", "budget_s"}
DATA = {"cpu_bare_decode_img_s_per_core", "cpu_train_transform_img_s_per_core",
        "cpu_train_transform_vs_bare_decode", "cpu_path", "gpu_path", "device_decode",
        "device_place", "fed", "goals"}
DATA_GOALS = {"gpu_img_s_per_gpu", "cpu_transform_vs_bare_decode", "device_decode_alone",
              "device_place_alone", "device_path_alone", "fed_vs_synthetic"}
LOADER_RUN = {"workers", "img_s", "cpu_cores_used", "images", "wall_s"}
BENCH = {"reports", "goals", "compile_over_eager", "fastest", "layout_detours"}
GOALS = {"attention56_mfu_vs_resnet50", "attention92_mfu_vs_resnet50", "attention56_img_per_s",
         "attention92_cifar_b64_img_per_s"}
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
    import platform

    import torch
    import torchvision

    assert set(report) == TOP
    assert report["cpu_only"] is True and report["benchmark"] == "gpu_check"
    # --cpu-only's sizes (CI size), the machine as this process sees it, the default budget.
    assert report["settings"] == {"train_images": 96, "val_images": 32, "loader_batch": 32,
                                  "loader_epochs": 2, "gpu_path_workers": [1], "train_crop": 64,
                                  "train_batch": 16, "train_workers": 1, "device_batch": 16,
                                  "device_crop": 64, "device_rounds": 2, "fed_batch": 4,
                                  "fed_crop": 64, "fed_workers": 1, "fed_steps": 2, "fed_warmup": 1}
    gpu = torch.cuda.is_available()
    assert {k: report["machine"][k] for k in ("cpu_cores", "python", "torch", "torchvision",
                                               "cuda_available", "cuda")} == {
        "cpu_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda_available": gpu, "cuda": torch.version.cuda}
    assert report["machine"]["gpu"] == (torch.cuda.get_device_name(0) if gpu else None)
    assert report["budget_s"] == 450.0 and report["wall_s"] > 0
    assert set(report["data"]) == DATA
    assert set(report["data"]["cpu_path"]) == LOADER_RUN
    assert [set(r) for r in report["data"]["gpu_path"]] == [LOADER_RUN | {"device"}]
    assert set(report["data"]["goals"]) == DATA_GOALS
    assert set(report["bench"]) == BENCH
    assert list(report["bench"]["reports"]) == ["attention56", "attention92", "attention92_cifar"]
    assert set(report["bench"]["goals"]) == GOALS
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


def test_the_device_paths_decode_place_and_fed_training_are_measured_against_issue_21s_goals(report):
    data = report["data"]
    decode, place, fed, goals = data["device_decode"], data["device_place"], data["fed"], data["goals"]
    # one batch of 16 JPEGs, a warm-up and 2 timed rounds, in the CPU form of the device path
    assert (decode["device"], decode["batch"], decode["images"]) == ("cpu", 16, 32)
    assert (place["device"], place["batch"], place["crop"], place["images"]) == ("cpu", 16, 64, 32)
    for run in (decode, place):
        assert run["img_s"] > 0 and run["cpu_cores_used"] > 0 and run["wall_s"] > 0
    assert decode["progressive_in_batch"] == 0 and fed["progressive"] == 0  # all baseline JPEGs
    assert (fed["model"], fed["device"], fed["precision"], fed["batch"], fed["steps"]) == (
        "attention56", "cpu", "fp32", 4, 2)
    assert fed["fed_img_s"] > 0 and fed["fed_cpu_cores_used"] > 0
    assert len(fed["synthetic_img_s"]) == 1 and fed["synthetic_img_s"][0] > 0  # twice on a GPU
    assert fed["fed_vs_synthetic"] == pytest.approx(fed["fed_img_s"] / max(fed["synthetic_img_s"]),
                                                    rel=0.02)
    # each stage against the device path's goal, as a ratio; "met" is for a GPU to judge
    for name, run in (("device_decode_alone", decode), ("device_place_alone", place)):
        goal = goals[name]
        assert (goal["goal"], goal["max_cpu_cores"], goal["met"]) == (7000, 2, None)
        assert goal["measured"] == run["img_s"] and goal["cpu_cores_used"] == run["cpu_cores_used"]
        assert goal["vs_goal"] == pytest.approx(run["img_s"] / 7000, abs=1e-3) and goal["vs_goal"] > 0
    assert goals["device_path_alone"]["measured"] == data["gpu_path"][0]["img_s"] > 0
    assert goals["device_path_alone"]["vs_goal"] > 0
    assert goals["fed_vs_synthetic"] == {"goal": 0.97, "measured": fed["fed_vs_synthetic"], "met": None}
    assert goals["fed_vs_synthetic"]["measured"] > 0


def test_the_bench_part_timed_each_model_beside_resnet50_and_left_the_gpu_figures_open(report):
    from ran.bench import Report, Row

    bench = report["bench"]
    reports = bench["reports"]
    for name, (model, crop) in {"attention56": ("attention56", 64), "attention92": ("attention92", 64),
                                "attention92_cifar": ("attention92", 32)}.items():
        r = reports[name]
        assert set(r) == set(Report.__dataclass_fields__), name
        assert (r["crop"], r["num_classes"]) == (crop, 10)
        models = [row["model"] for row in r["rows"]]
        assert models == ([model, "resnet50"] if name == "attention56" else [model]), name
        for row in r["rows"]:
            assert set(row) == set(Row.__dataclass_fields__)
            assert row["variant"] == "fp32 eager" and row["batch_size"] == 2
            assert row["img_per_s"] > 0 and row["mfu"] > 0 and row["loss_ok"] is True
        assert r["layout"]["detours"] == {} and r["fastest"]["set"].startswith("--set train.precision=fp32")
    # relative to ResNet-50 in this run; the goals are for a GPU, so not judged here.
    a56, base = reports["attention56"]["rows"]
    goal = bench["goals"]["attention56_mfu_vs_resnet50"]
    assert goal["measured"] == pytest.approx(a56["mfu"] / base["mfu"], abs=2e-3) and goal["met"] is None
    assert bench["goals"]["attention92_mfu_vs_resnet50"]["measured"] > 0
    assert all(g["met"] is None for g in bench["goals"].values())
    assert bench["layout_detours"] == {"attention56": {}, "attention92": {}, "attention92_cifar": {}}
    profile = reports["attention56"]["profile"]
    assert profile["time"] == "cpu" and profile["launches_per_step"] > 100
    assert {"batch_norm", "convolution"} <= set(profile["share"])
    assert sum(profile["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert report["not_measured"] and "cpu-only" in report["not_measured"][0]


def test_ran_train_finished_checkpointed_logged_and_the_registered_model_evaluates_the_same(report):
    train = report["train"]
    assert (train["exit_code"], train["finished"]) == (0, True)
    # 96 samples at batch 16: 6 steps an epoch, a checkpoint after each of the 2 epochs.
    assert train["checkpoints"] == ["epoch=0001_step=0000006", "epoch=0002_step=0000012"]
    assert train["mlflow_status"] == "FINISHED" and len(train["mlflow_run_id"]) == 32
    assert {"train/loss", "eval/top1", "perf/img_per_s"} <= set(train["mlflow_metrics"])
    assert train["registered_model"] == "models:/gpu-check-attention56/1"
    assert len(train["val_top1_by_epoch"]) == 2
    assert (train["eval_exit_code"], train["eval_images"]) == (0, 32)
    assert train["top1_registered_model_on_cpu"] == pytest.approx(train["top1_training_validation"], abs=1e-4)
    assert train["top1_equal"] is True
