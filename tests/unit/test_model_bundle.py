"""One model bundle for every verb (issue 20): every registered model, named by a checkpoint (its run
directory), an MLflow run id and a registered version, loads as the same bundle, and ``ran eval``,
the served pyfunc's ``predict``, ``ran explain`` and the promotion gate's re-evaluation feed its
model the same pixels and get the same probabilities, bitwise (CPU, fp32).

Cheap by construction: one MLflow sqlite store for the module, three 8x8 images (the smallest input
the stems take) through the CIFAR stem (each recipe's eval transform: the model's own stem's),
each model built once from a seed and logged through the real logging function
(``ran.tracking.log_final_model``) without training. What every verb's forward pass sees is read by
a global forward hook on the models' top-level call (3-channel images in, logits out).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ran.config import parse_config
from ran.models import list_models, model_defaults

SIZE = 8  # the smallest input the CIFAR and ImageNet stems take
IMAGES = 3  # val images, one batch for every verb
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A sqlite store (the working directory holds its artifacts) and 4-class 8x8 shards; one
    intra-op thread (bitwise comparisons need only that every verb runs alike)."""
    from ran.data.synth import write_synthetic

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads made each forward 40x slower
    root = tmp_path_factory.mktemp("bundle")
    data = root / "synth"
    write_synthetic(str(data), classes=4, train=4, val=IMAGES, size=SIZE, samples_per_shard=IMAGES,
                    workers=1, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.chdir(root)
        yield {"root": root, "data": str(data)}
    torch.set_num_threads(threads)


def _val_samples(data: str) -> list[tuple[bytes, int]]:
    """Every (encoded image, label) of the val split, in shard order (ran eval's order)."""
    from ran.data.read import iter_tar, open_shard, parse_sample, read_manifest, split_shards

    manifest = read_manifest(data)
    samples = []
    for url, _ in split_shards(data, manifest, "val"):
        with open_shard(url) as stream:
            samples += [parse_sample(s, manifest["num_classes"]) for _, s in iter_tar(stream)]
    return [(bytes(s[0]), int(s[1])) for s in samples]


class Forwards:
    """Every top-level model call while active: (input, float32 logits), copied."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, module, args, output) -> None:
        x = args[0] if args else None
        logits = output[0] if isinstance(output, tuple) else output
        if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 3
                and isinstance(logits, torch.Tensor) and logits.dim() == 2):
            self.calls.append((x.detach().clone(), logits.detach().float().clone()))

    def __enter__(self) -> "Forwards":
        self.handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _references(env, name: str) -> dict[str, str]:
    """``name`` built once from a seed and kept three ways: a checkpoint as ``ran train`` writes
    it (referenced by its run directory), the logged model of an MLflow run (its run id) and a
    registered version of that logged model."""
    import mlflow

    from ran.data.read import read_manifest
    from ran.data.transforms import normalizer
    from ran.runtime import CHECKPOINT_FILE, build_model
    from ran.tracking import RunTracker, log_final_model, run_source

    recipe = model_defaults(name).stem  # both eval transforms; the CIFAR stem is the cheaper one
    cfg = parse_config({
        "model": {"name": name, "stem": "cifar", "num_classes": 4},
        "data": {"recipe": recipe, "path": env["data"], "crop": SIZE, "batch_size": IMAGES,
                 "workers": 0},
        "train": {"precision": "fp32"},
        "tracking": {"experiment": f"bundle-{name}", "registered_model": f"bundle-{name}"}})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tracker = RunTracker.create_training(cfg, run_name=name, tags={})
    checkpoint = env["root"] / name / "epoch=0000_step=0000000"
    checkpoint.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(), "run_id": tracker.run_id,
                "epoch": 0, "step": 0, "samples": 0}, checkpoint / CHECKPOINT_FILE)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    example = normalizer(recipe)(images).numpy().astype(np.float32)
    classes = read_manifest(env["data"])["classes"]  # what a checkpoint's manifest names too
    assert log_final_model(tracker, model, cfg, classes, example, {}, register=False, quiet=True) is None
    tracker.finish()
    logged = run_source(tracker.run_id)
    version = mlflow.register_model(logged.model_uri, f"bundle-{name}").version
    return {"checkpoint": str(checkpoint.parent), "run id": tracker.run_id,
            "registered version": f"models:/bundle-{name}/{version}"}


@pytest.mark.parametrize("name", list_models())
def test_every_reference_and_verb_gives_the_same_pixels_and_probabilities(env, name, tmp_path):
    import mlflow.pyfunc

    from ran.cli import main
    from ran.data.read import read_manifest
    from ran.promotion import evaluated_standing
    from ran.runtime import ModelBundle
    from ran.serving import ImageClassifier, _Pyfunc

    refs = _references(env, name)
    samples = _val_samples(env["data"])
    encoded = [data for data, _ in samples]
    labels = torch.tensor([label for _, label in samples])
    paths = []
    for i, data in enumerate(encoded):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)

    classes = read_manifest(env["data"])["classes"]
    bundles = {kind: ModelBundle.load(ref, device=CPU) for kind, ref in refs.items()}
    assert [b.source.kind for b in bundles.values()] == ["checkpoint", "run", "registry"]
    first = bundles["checkpoint"]
    weights = first.model.state_dict()
    for kind, bundle in bundles.items():  # the same bundle, whatever the reference
        assert (bundle.crop, bundle.precision, bundle.channels_last) == (SIZE, "fp32", True), kind
        assert bundle.config == first.config, kind
        assert bundle.class_names == classes, kind
        assert all(torch.equal(v, weights[k]) for k, v in bundle.model.state_dict().items()), kind

    answers, standings = {}, {}
    with Forwards() as forwards:
        for kind, ref in refs.items():
            out = tmp_path / kind.replace(" ", "_")
            assert main(["eval", ref, "--data", env["data"], "--batch-size", str(IMAGES),
                         "--workers", "0"]) == 0
            served = (ImageClassifier(bundles[kind]) if kind == "checkpoint"
                      else mlflow.pyfunc.load_model(bundles[kind].source.model_uri))
            answers[kind] = served.predict(encoded)
            assert main(["explain", ref, *map(str, paths), "--out", str(out)]) == 0
            standings[kind] = evaluated_standing(ref, "1", env["data"])
    assert len(forwards.calls) == 4 * len(refs)  # one forward of the 3 images per verb
    pixels, logits = forwards.calls[0]
    assert pixels.shape == (IMAGES, 3, SIZE, SIZE) and logits.shape == (IMAGES, 4)
    for i, (x, y) in enumerate(forwards.calls):
        assert torch.equal(x, pixels), f"call {i}: other pixels"
        assert torch.equal(y, logits), f"call {i}: other logits"

    probs = logits.softmax(dim=1)
    top = probs.topk(4, dim=1)
    for kind, answer in answers.items():
        assert answer["indices"].tolist() == top.indices.tolist(), kind
        assert answer["probabilities"].tolist() == [[round(float(p), 6) for p in row]
                                                    for row in top.values.tolist()], kind
    top1 = int((probs.argmax(dim=1) == labels).sum()) / IMAGES
    assert {kind: s.top1 for kind, s in standings.items()} == {kind: top1 for kind in refs}
    assert isinstance(_Pyfunc(ImageClassifier(first)), _Pyfunc)
