"""Copies of a model with probes: copy.deepcopy, pickling (what ddp_spawn does), and Lightning's weight averaging.

The README's probe is lazy (``LinearProbe(num_classes)`` infers its input size at the first batch), so every copy
below is made before that batch. ``ddp_spawn`` itself runs in ``tests/distributed/test_ddp.py``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging, WeightAveraging

from sslprobe import Module
from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep
from sslprobe.probes import LinearProbe
from tests.conftest import NUM_CLASSES, dict_loader, make_module, make_trainer

EPOCHS = 3


def with_probes(model: Module) -> list:
    """A lazy LinearProbe, a (lazy) ProbeSweep and an OnlineKNN on ``model``."""
    return [
        OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES)),
        ProbeSweep(model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], weight_decays=[0]),
        OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1),
    ]


def fit(model: Module, callbacks: list, **kw) -> dict[str, float]:
    trainer = make_trainer(max_epochs=EPOCHS, callbacks=callbacks, **kw)
    trainer.fit(model, dict_loader(), dict_loader(seed=0))
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "eval/"))}


def assert_same_probes(model: Module, reference: Module) -> None:
    """Every probe tensor (weights, normalisation statistics) equal, bit for bit."""
    mine, theirs = model.callbacks_modules.state_dict(), reference.callbacks_modules.state_dict()
    assert list(mine) == list(theirs)
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


@pytest.fixture(scope="module")
def reference() -> tuple[Module, dict[str, float]]:
    """The run every copy is compared with: a trained main model, no copy, no averaging."""
    model = make_module()
    return model, fit(model, with_probes(model))


@pytest.fixture(scope="module")
def frozen_reference() -> tuple[Module, dict[str, float]]:
    """The same with a frozen main model (optim=None)."""
    model = make_module(optim=None)
    return model, fit(model, with_probes(model))


@pytest.mark.parametrize("trained", ["original", "copy"])
def test_deepcopy_before_training_copies_lazy_probes(trained, reference):
    model = make_module()
    callbacks = with_probes(model)
    copied = copy.deepcopy(model)
    assert copied.callbacks_modules["linear"] is not model.callbacks_modules["linear"]
    assert copied.callbacks_modules["linear"].in_features is None  # still lazy: it waits for its own first batch
    # The callbacks find their probe in the module the Trainer is given: either one trains as an uncopied model.
    metrics = fit(model if trained == "original" else copied, callbacks)
    assert_same_probes(model if trained == "original" else copied, reference[0])
    assert metrics == pytest.approx(reference[1])
    untouched = copied if trained == "original" else model
    assert (
        untouched.callbacks_modules["linear"].in_features is None
        and untouched.callbacks_modules["sweep"].in_features is None
    )
    # The untouched copy still takes the trained state: its lazy probes build from it.
    untouched.callbacks_modules.load_state_dict(reference[0].callbacks_modules.state_dict())
    assert_same_probes(untouched, reference[0])


def test_callbacks_and_a_model_with_lazy_probes_pickle_and_train_as_the_originals(reference):
    model = make_module()
    callbacks = with_probes(model)
    for callback in callbacks:  # torch.save(callback) and back
        buffer = io.BytesIO()
        torch.save(callback, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(loaded) is type(callback) and loaded.name == callback.name
    assert pickle.loads(pickle.dumps(callbacks[1])).head_labels == [
        "lr0.01_wd0",
        "lr0.1_wd0",
    ]
    # ddp_spawn pickles the module and the Trainer's callbacks together into each new process.
    model, callbacks = pickle.loads(pickle.dumps((model, callbacks)))
    metrics = fit(model, callbacks)
    assert_same_probes(model, reference[0])
    assert metrics == pytest.approx(reference[1])


AVERAGING = {
    "swa": lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1),
    "ema": lambda: EMAWeightAveraging(decay=0.5),
    "swa_per_step": lambda: WeightAveraging(),
}


@pytest.mark.parametrize("order", ["averaging_first", "probes_first"])
@pytest.mark.parametrize("averaging", sorted(AVERAGING))
def test_weight_averaging_leaves_the_probes_as_they_train(averaging, order, frozen_reference):
    # A frozen backbone: the run without averaging is the exact reference for every probe, whatever the callback
    # does to the main model's schedule (SWA swaps in its own). Were a probe averaged, its weights would differ.
    model = make_module(optim=None)
    probes = with_probes(model)
    callbacks = [AVERAGING[averaging](), *probes] if order == "averaging_first" else [*probes, AVERAGING[averaging]()]
    metrics = fit(model, callbacks)
    assert_same_probes(model, frozen_reference[0])
    assert probes[0].stepper.steps == probes[1].stepper.steps == EPOCHS * 6
    assert {k for k in metrics if k.startswith("eval/")} == {k for k in frozen_reference[1] if k.startswith("eval/")}
    assert metrics == pytest.approx(frozen_reference[1])


def test_ema_of_a_training_model_averages_the_model_but_not_the_probes(reference):
    model = make_module()
    metrics = fit(model, [EMAWeightAveraging(decay=0.5), *with_probes(model)])
    # The probes trained on the live model's features, exactly as without EMA; the model ends as its average.
    assert_same_probes(model, reference[0])
    assert not torch.equal(model.backbone[0].weight, reference[0].backbone[0].weight)
    assert {"eval/linear_top1", "eval/sweep_top1", "eval/knn_top1"} <= set(metrics)
    assert metrics["train/linear_loss"] == pytest.approx(reference[1]["train/linear_loss"])


def test_a_checkpoint_with_ema_resumes_the_probe_exactly(tmp_path):
    def run(epochs, save=False, ckpt_path=None):
        model = make_module()
        probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES, in_features=16))
        saver = [ModelCheckpoint(dirpath=tmp_path, filename="ema")] if save else []
        callbacks = [probe, EMAWeightAveraging(decay=0.5), *saver]
        trainer = make_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=save)
        trainer.fit(model, dict_loader(), dict_loader(seed=0), ckpt_path=ckpt_path)
        return model, probe

    whole, whole_probe = run(EPOCHS)
    run(1, save=True)
    resumed, resumed_probe = run(EPOCHS, ckpt_path=str(tmp_path / "ema.ckpt"))
    assert resumed_probe.stepper.steps == whole_probe.stepper.steps == EPOCHS * 6
    assert_same_probes(resumed, whole)


def test_a_checkpoint_with_ema_and_a_lazy_probe_loads_with_weights_only(tmp_path):
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    saver = ModelCheckpoint(dirpath=tmp_path, filename="ema")
    trainer = make_trainer(max_epochs=1, callbacks=[probe, EMAWeightAveraging(), saver], enable_checkpointing=True)
    trainer.fit(model, dict_loader())
    torch.load(tmp_path / "ema.ckpt", weights_only=True)
