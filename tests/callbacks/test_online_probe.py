from __future__ import annotations

import copy
import functools
import math
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from sslprobe import LARS, Module
from sslprobe.callbacks import OnlineProbe
from sslprobe.optim.factories import DEFAULT_PROBE_LARS
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, make_module, make_trainer, make_xy, tuple_loader


def linear_probe() -> nn.Module:
    return nn.Linear(D_EMB, NUM_CLASSES)


class FeatureSpy(Callback):
    """Records what a probe sees after each training batch: detached features and labels."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((outputs["embedding"].detach().clone(), batch["label"].clone()))


def reference_probe(
    probe: nn.Module,
    seen: list[tuple[torch.Tensor, torch.Tensor]],
    make_optimizer,
    accumulate: int = 1,
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
) -> nn.Module:
    """The plain PyTorch loop an online probe must match: mean gradient of N batches, clip, step."""
    probe = copy.deepcopy(probe)
    params = list(probe.parameters())
    optimizer = make_optimizer(params)
    window: list[list[torch.Tensor]] = []
    for features, target in seen:
        loss = F.cross_entropy(probe(features), target)
        window.append(list(torch.autograd.grad(loss, params)))
        if len(window) == accumulate:
            for i, p in enumerate(params):
                p.grad = torch.stack([g[i] for g in window]).sum(0) / accumulate if accumulate > 1 else window[0][i]
            if clip_val is not None:
                if clip_algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(params, clip_val)
                else:
                    torch.nn.utils.clip_grad_value_(params, clip_val)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window = []
    return probe


class Batches:
    """A sized iterable of prebuilt batches (a plain list would be read as several dataloaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    ("accumulate", "clip_val", "clip_algorithm"), [(1, None, "norm"), (3, 0.05, "norm"), (2, 0.01, "value")]
)
def test_probe_matches_hand_written_loop(accumulate, clip_val, clip_algorithm):
    model = make_module()
    torch.manual_seed(1)
    initial = linear_probe()
    make_opt = functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9)
    probe = OnlineProbe(
        model,
        "linear",
        input="embedding",
        target="label",
        probe=copy.deepcopy(initial),
        optimizer=make_opt,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=clip_algorithm,
    )
    spy = FeatureSpy()
    make_trainer(max_epochs=2, callbacks=[spy, probe]).fit(model, dict_loader())
    expected = reference_probe(initial, spy.seen, make_opt, accumulate, clip_val, clip_algorithm)
    assert len(spy.seen) == 12
    for got, want in zip(model.callbacks_modules["linear"].parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)
    assert not torch.equal(model.callbacks_modules["linear"].weight, initial.weight)


def test_default_optimizer_is_lars_with_probe_defaults():
    model = make_module(optim=None)
    torch.manual_seed(1)
    initial = linear_probe()
    probe = OnlineProbe(model, "linear", input="embedding", target="label", probe=copy.deepcopy(initial))
    spy = FeatureSpy()
    make_trainer(max_epochs=1, callbacks=[spy, probe]).fit(model, dict_loader())
    assert isinstance(probe.stepper.optimizer, LARS)
    assert {k: probe.stepper.optimizer.defaults[k] for k in DEFAULT_PROBE_LARS} == DEFAULT_PROBE_LARS
    expected = reference_probe(initial, spy.seen, lambda p: LARS(p, **DEFAULT_PROBE_LARS))
    for got, want in zip(model.callbacks_modules["linear"].parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)


def test_main_model_bit_identical_with_and_without_probes():
    def run(with_probes: bool) -> dict[str, torch.Tensor]:
        pl.seed_everything(7, verbose=False)
        model = make_module(optim={"type": "AdamW", "lr": 1e-2, "weight_decay": 0.1})
        callbacks = []
        if with_probes:
            callbacks = [
                OnlineProbe(model, "lazy", "embedding", "label", probe=nn.LazyLinear(NUM_CLASSES)),
                OnlineProbe(
                    model,
                    "mlp",
                    "embedding",
                    "label",
                    probe=functools.partial(nn.Linear, D_EMB, NUM_CLASSES),
                    optimizer="AdamW",
                    accumulate_grad_batches=2,
                    gradient_clip_val=0.1,
                ),
                OnlineProbe(
                    model,
                    "drop",
                    "embedding",
                    "label",
                    probe=lambda: nn.Sequential(nn.Dropout(0.5), nn.Linear(D_EMB, NUM_CLASSES)),
                ),
            ]
        loader = dict_loader(shuffle=True)
        make_trainer(max_epochs=2, callbacks=callbacks, limit_val_batches=2).fit(model, loader, dict_loader())
        return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("callbacks_")}

    without, with_ = run(False), run(True)
    assert without.keys() == with_.keys()
    for key in without:
        assert torch.equal(without[key], with_[key]), key


def test_main_optimizer_with_probe_in_it_leaves_probe_to_its_own_optimizer():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(8, D_EMB)

        def training_step(self, batch, batch_idx):
            emb = self.backbone(batch["x"])
            return {"loss": emb.pow(2).mean(), "embedding": emb}

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.5, weight_decay=0.5)

    torch.manual_seed(0)
    model = Plain()
    initial = linear_probe()
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=copy.deepcopy(initial), optimizer={"type": "SGD", "lr": 0.0}
    )
    make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    for got, want in zip(model.callbacks_modules["linear"].parameters(), initial.parameters()):
        assert torch.equal(got, want)
    # and with a real learning rate it trains exactly as its own loop says
    torch.manual_seed(0)
    model = Plain()
    make_opt = functools.partial(torch.optim.SGD, lr=0.1)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=copy.deepcopy(initial), optimizer=make_opt)
    spy = FeatureSpy()
    make_trainer(max_epochs=1, callbacks=[spy, probe]).fit(model, dict_loader())
    expected = reference_probe(initial, spy.seen, make_opt)
    for got, want in zip(model.callbacks_modules["linear"].parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)


def test_probe_own_steps_do_not_change_global_step_or_main_schedule():
    model = make_module(optim={"optimizer": {"type": "SGD", "lr": 0.1}, "scheduler": "StepLR", "interval": "step"})
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe(), scheduler="CosineAnnealingLR")
    trainer = make_trainer(max_steps=5, max_epochs=-1, callbacks=[probe])
    trainer.fit(model, dict_loader())
    assert trainer.global_step == 5
    assert probe.stepper.steps == 5
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5
    assert probe.stepper.scheduler.T_max == 5


# ---------------------------------------------------------------------------------------------- logging


def test_log_names_exact_in_callback_metrics_and_logger(tmp_path):
    model = make_module()
    probe = OnlineProbe(
        model,
        "linear",
        "embedding",
        "label",
        probe=linear_probe(),
        metrics={"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")},
    )
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(max_epochs=2, callbacks=[probe], logger=logger, log_every_n_steps=1)
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    probe_keys = {k for k in trainer.callback_metrics if "linear" in k}
    assert probe_keys == {"train/linear_loss", "train/linear_top1", "eval/linear_top1"}
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/linear_loss", "train/linear_top1", "eval/linear_top1"} <= set(header)
    assert not [h for h in header if "linear" in h and h.endswith(("_step", "_epoch"))]


def test_eval_metric_equals_offline_accuracy_of_final_probe():
    model = make_module(optim=None)
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=linear_probe(), optimizer={"type": "SGD", "lr": 0.1}
    )
    trainer = make_trainer(max_epochs=2, callbacks=[probe])
    val = dict_loader(n=30, seed=3, batch_size=7)
    trainer.fit(model, dict_loader(), val)
    x, y = make_xy(30, seed=3)
    with torch.no_grad():
        preds = model.callbacks_modules["linear"](model.backbone(x)).argmax(-1)
    assert trainer.callback_metrics["eval/linear_top1"].item() == pytest.approx((preds == y).float().mean().item())


def test_train_metrics_tracked_for_plain_dict_and_list_metrics():
    model = make_module()
    acc = functools.partial(torchmetrics.classification.MulticlassAccuracy, NUM_CLASSES)
    a = OnlineProbe(model, "a", "embedding", "label", probe=linear_probe(), metrics={"acc": acc()})
    b = OnlineProbe(model, "b", "embedding", "label", probe=linear_probe(), metrics=[acc(), acc(average="macro")])
    c = OnlineProbe(
        model, "c", "embedding", "label", probe=linear_probe(), metrics={"train": acc(), "val": [acc(top_k=2)]}
    )
    trainer = make_trainer(max_epochs=1, callbacks=[a, b, c])
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    keys = set(trainer.callback_metrics)
    assert {"train/a_acc", "eval/a_acc"} <= keys
    assert {"train/b_multiclass_accuracy", "train/b_multiclass_accuracy_2", "eval/b_multiclass_accuracy_2"} <= keys
    assert {"train/c_multiclass_accuracy", "eval/c_multiclass_accuracy"} <= keys
    assert "eval/c_multiclass_accuracy_2" not in keys
    # separate copies per split: the metric objects given are not shared between train and eval
    metrics = model.callbacks_metrics["a"]
    assert metrics["fit"]["acc"] is not metrics["validate"]["acc"]


def test_metric_monitoring_with_early_stopping_and_checkpoint(tmp_path):
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe())
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="eval/linear_top1", mode="max", save_top_k=1)
    stop = EarlyStopping(monitor="eval/linear_top1", mode="max", patience=1, stopping_threshold=0.0)
    trainer = make_trainer(max_epochs=5, callbacks=[probe, ckpt, stop], enable_checkpointing=True)
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    assert trainer.current_epoch == 1  # stopped by the threshold after the first validation
    assert ckpt.best_model_score is not None
    assert ckpt.best_model_score.item() == pytest.approx(trainer.callback_metrics["eval/linear_top1"].item())


# ---------------------------------------------------------------------------------------------- predictions


class PredsSpy(Callback):
    def __init__(self, key: str) -> None:
        self.key, self.found = key, {}

    def _grab(self, stage, outputs, batch):
        holder = batch if isinstance(batch, dict) else outputs
        self.found.setdefault(stage, []).append(holder.get(self.key))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._grab("train", outputs, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._grab("val", outputs, batch)


def test_predictions_in_batch_dict_and_in_outputs_for_tuple_batches():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe())
    spy = PredsSpy("linear_preds")
    make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[probe, spy]).fit(
        model, dict_loader(), dict_loader()
    )
    assert [p.shape for p in spy.found["train"]] == [(8, NUM_CLASSES)] * 2
    assert spy.found["val"][0].shape == (8, NUM_CLASSES)
    assert not spy.found["train"][0].requires_grad

    class TupleModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(8, D_EMB)

        def training_step(self, batch, batch_idx):
            emb = self.backbone(batch[0])
            return {"loss": emb.pow(2).mean(), "embedding": emb}

        def validation_step(self, batch, batch_idx):
            return {"embedding": self.backbone(batch[0])}

        def configure_optimizers(self):
            return torch.optim.SGD(self.backbone.parameters(), lr=0.1)

    model = TupleModel()
    probe = OnlineProbe(model, "linear", "embedding", 1, probe=linear_probe())
    spy = PredsSpy("linear_preds")
    make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[probe, spy]).fit(
        model, tuple_loader(), tuple_loader()
    )
    assert spy.found["train"][0].shape == (8, NUM_CLASSES)
    assert spy.found["val"][0].shape == (8, NUM_CLASSES)


def test_input_forms_dotted_path_index_and_callable():
    def forward(self, batch, stage):
        emb = self.backbone(batch[0])
        return {"views": [emb, emb * 2], "loss": emb.pow(2).mean()}

    torch.manual_seed(0)
    model = Module(forward=forward, backbone=nn.Linear(8, D_EMB), optim="SGD")
    a = OnlineProbe(model, "dotted", "views.1", 1, probe=linear_probe())
    b = OnlineProbe(model, "index", 0, 1, probe=nn.Linear(8, NUM_CLASSES))
    c = OnlineProbe(
        model, "call", lambda out, batch: out["views"][0] + 1, lambda out, batch: batch[1], probe=linear_probe()
    )
    make_trainer(max_epochs=1, callbacks=[a, b, c]).fit(model, tuple_loader(), tuple_loader())
    assert all(cb.stepper.steps == 6 for cb in (a, b, c))


# ---------------------------------------------------------------------------------------------- stages


def test_repeated_fit_validate_test_predict_on_one_module():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=nn.LazyLinear(NUM_CLASSES))
    trainer = make_trainer(max_epochs=1, callbacks=[probe])
    trainer.validate(model, dict_loader(n=16))
    trainer.fit(model, dict_loader(), dict_loader(n=16))
    first = model.callbacks_modules["linear"].weight.detach().clone()
    trainer.test(model, dict_loader(n=16))
    trainer2 = make_trainer(max_epochs=2, callbacks=[probe])
    trainer2.fit(model, dict_loader(), dict_loader(n=16))
    assert not torch.equal(first, model.callbacks_modules["linear"].weight)
    out = trainer2.predict(model, dict_loader(n=16))
    assert out[0]["linear_preds"].shape == (8, NUM_CLASSES)
    results = trainer2.test(model, dict_loader(n=16))
    assert "test/linear_top1" in results[0]
    trainer2.validate(model, dict_loader(n=16))
    assert "eval/linear_top1" in trainer2.callback_metrics


def test_test_logs_probe_metrics_and_predict_needs_no_labels():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe())
    trainer = make_trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(model, dict_loader())
    results = trainer.test(model, dict_loader(n=24))
    x, y = make_xy(24)
    with torch.no_grad():
        acc = (model.callbacks_modules["linear"](model.backbone(x)).argmax(-1) == y).float().mean().item()
    assert results[0]["test/linear_top1"] == pytest.approx(acc)

    unlabeled = torch.utils.data.DataLoader([{"x": x[i]} for i in range(24)], batch_size=8)
    preds = trainer.predict(model, unlabeled)
    assert torch.equal(
        torch.cat([p["linear_preds"] for p in preds]).argmax(-1),
        model.callbacks_modules["linear"](model.backbone(x)).argmax(-1),
    )
    with pytest.warns(UserWarning, match="hold no target"):
        results = trainer.test(model, unlabeled)
    assert "test/linear_top1" not in results[0]


def test_probe_acts_only_when_in_the_trainer_and_follows_the_module_given():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe())
    before = model.callbacks_modules["linear"].weight.detach().clone()
    make_trainer(max_epochs=1).fit(model, dict_loader())
    assert torch.equal(model.callbacks_modules["linear"].weight, before)
    assert "linear_preds" not in model(dict(x=torch.randn(2, 8)), "fit")

    clone = copy.deepcopy(model)
    make_trainer(max_epochs=1, callbacks=[probe]).fit(clone, dict_loader())
    assert torch.equal(model.callbacks_modules["linear"].weight, before)
    assert not torch.equal(clone.callbacks_modules["linear"].weight, before)


# ---------------------------------------------------------------------------------------------- checkpoints


def _resume_pair(tmp_path, accumulate: int, scheduler):
    def build():
        model = make_module(optim={"type": "SGD", "lr": 0.05, "momentum": 0.9})
        torch.manual_seed(3)
        probe = OnlineProbe(
            model,
            "linear",
            "embedding",
            "label",
            probe=nn.LazyLinear(NUM_CLASSES),
            optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9},
            scheduler=scheduler,
            accumulate_grad_batches=accumulate,
        )
        return model, probe

    # 6 batches per epoch and accumulate=4: the checkpoint after epoch 1 holds a half-full window.
    model_a, probe_a = build()
    make_trainer(max_epochs=3, callbacks=[probe_a]).fit(model_a, dict_loader())

    class Interrupt(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True  # as if the job were killed after the first epoch's checkpoint

    model_b, probe_b = build()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(max_epochs=3, callbacks=[probe_b, ckpt, Interrupt()], enable_checkpointing=True).fit(
        model_b, dict_loader()
    )
    assert probe_b.stepper.batches == (6 % accumulate)
    model_c, probe_c = build()
    make_trainer(max_epochs=3, callbacks=[probe_c]).fit(model_c, dict_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    return (model_a, probe_a), (model_c, probe_c)


@pytest.mark.parametrize(
    ("accumulate", "scheduler"),
    [(4, "CosineAnnealingLR"), (1, {"type": "StepLR", "step_size": 1, "interval": "epoch"})],
)
def test_resume_continues_exactly(tmp_path, accumulate, scheduler):
    (model_a, probe_a), (model_c, probe_c) = _resume_pair(tmp_path, accumulate, scheduler)
    for (k, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(a, c), k
    assert probe_a.stepper.steps == probe_c.stepper.steps
    assert probe_a.stepper.batches == probe_c.stepper.batches
    assert probe_a.stepper.optimizer.param_groups[0]["lr"] == probe_c.stepper.optimizer.param_groups[0]["lr"]


def test_probe_on_pieces_trains_and_resumes_exactly_as_on_whole_tensors(tmp_path, monkeypatch):
    from sslprobe.optim import stepper as stepper_module

    def run(cut: bool, interrupt_at_epoch: int | None = None, ckpt_path: str | None = None):
        # On a GPU a fused AdamW probe steps on flat pieces; forced here on the CPU, where the kernel also runs.
        monkeypatch.setattr(stepper_module, "_cuts", lambda params, optimizer: cut)
        model = make_module(optim={"type": "SGD", "lr": 0.05})
        torch.manual_seed(3)
        probe = OnlineProbe(model, "wide", "embedding", "label", probe=nn.Linear(D_EMB, 300), optimizer="AdamW")
        callbacks: list[Callback] = [probe]
        if interrupt_at_epoch is not None:

            class Interrupt(Callback):
                def on_train_epoch_end(self, trainer, pl_module):
                    trainer.should_stop = trainer.current_epoch + 1 >= interrupt_at_epoch

            callbacks += [ModelCheckpoint(dirpath=tmp_path, save_last=True), Interrupt()]
        make_trainer(max_epochs=3, callbacks=callbacks, enable_checkpointing=interrupt_at_epoch is not None).fit(
            model, dict_loader(), ckpt_path=ckpt_path
        )
        return model, probe

    whole_model, _ = run(cut=False)
    model, probe = run(cut=True)
    assert probe.stepper._grad_buffers  # the weight (16 x 300) was cut
    run(cut=True, interrupt_at_epoch=1)
    resumed, _ = run(cut=True, ckpt_path=str(tmp_path / "last.ckpt"))
    for (key, a), b, c in zip(
        whole_model.state_dict().items(), model.state_dict().values(), resumed.state_dict().values()
    ):
        assert torch.equal(a, b) and torch.equal(a, c), key
    torch.manual_seed(3)
    initial = nn.Linear(D_EMB, 300).weight
    assert not torch.allclose(model.callbacks_modules["wide"].weight, initial)  # it trained


def test_checkpoint_loads_strictly_into_fresh_module_and_with_weights_only(tmp_path):
    model = make_module()
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=nn.LazyLinear(NUM_CLASSES), accumulate_grad_batches=4
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(max_epochs=1, callbacks=[probe, ckpt], enable_checkpointing=True).fit(model, dict_loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    # The model's weights alone: the same class built without any probe loads them strictly.
    assert not any("callbacks_" in key for key in checkpoint["state_dict"])
    make_module().load_state_dict(checkpoint["state_dict"], strict=True)
    # With the probe too; its weights sit in its callback state.
    fresh = make_module()
    OnlineProbe(fresh, "linear", "embedding", "label", probe=nn.LazyLinear(NUM_CLASSES))
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    state = checkpoint["callbacks"][probe.state_key]
    fresh.callbacks_modules["linear"].load_state_dict(state["module"])
    assert torch.equal(fresh.callbacks_modules["linear"].weight, model.callbacks_modules["linear"].weight)
    assert state["batches"] == 2 and state["steps"] == 1
    assert {"optimizer", "scheduler", "accumulated", "rng", "module"} <= set(state)


def test_state_dict_round_trip_and_parking():
    model = make_module()
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=linear_probe(), optimizer="AdamW", accumulate_grad_batches=3
    )
    make_trainer(max_epochs=1, limit_train_batches=4, callbacks=[probe]).fit(model, dict_loader())
    state = probe.state_dict()
    other_model = make_module()
    other = OnlineProbe(
        other_model, "linear", "embedding", "label", probe=linear_probe(), optimizer="AdamW", accumulate_grad_batches=3
    )
    other.load_state_dict(copy.deepcopy(state))
    assert other.stepper is None  # parked until the optimizer exists
    other_model.load_state_dict(model.state_dict())
    make_trainer(max_epochs=1, limit_train_batches=0, callbacks=[other]).fit(other_model, dict_loader())
    again = other.state_dict()
    assert again["batches"] == state["batches"] == 1
    torch.testing.assert_close(again["accumulated"], state["accumulated"])
    torch.testing.assert_close(again["optimizer"]["state"], state["optimizer"]["state"])


# ---------------------------------------------------------------------------------------------- forms


@pytest.mark.parametrize(
    "make_probe",
    [
        pytest.param(lambda: nn.Linear(D_EMB, NUM_CLASSES), id="instance"),
        pytest.param(lambda: functools.partial(nn.Linear, D_EMB, NUM_CLASSES), id="partial"),
        pytest.param(
            lambda: lambda: nn.Sequential(nn.Linear(D_EMB, 4), nn.ReLU(), nn.Linear(4, NUM_CLASSES)), id="callable"
        ),
        pytest.param(
            lambda: {"_target_": "torch.nn.Linear", "in_features": D_EMB, "out_features": NUM_CLASSES}, id="hydra-dict"
        ),
        pytest.param(lambda: nn.LazyLinear(NUM_CLASSES), id="lazy"),
    ],
)
def test_probe_forms_train(make_probe):
    model = make_module(optim=None)
    spec = make_probe()
    if isinstance(spec, dict):
        pytest.importorskip("hydra", reason="the hydra extra (in the test extra) instantiates _target_ configs")
    rng_before = torch.get_rng_state()
    probe = OnlineProbe(model, "p", "embedding", "label", probe=spec, optimizer={"type": "SGD", "lr": 0.2})
    assert torch.equal(torch.get_rng_state(), rng_before)  # building the probe drew from a private stream
    trainer = make_trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader(n=16))
    assert probe.stepper.steps == 6
    assert "eval/p_top1" in trainer.callback_metrics
    assert all(p.grad is None for p in model.callbacks_modules["p"].parameters())


def test_hydra_omegaconf_config():
    omegaconf = pytest.importorskip("omegaconf")
    model = make_module()
    cfg = omegaconf.OmegaConf.create({"_target_": "torch.nn.Linear", "in_features": D_EMB, "out_features": NUM_CLASSES})
    OnlineProbe(model, "p", "embedding", "label", probe=cfg)
    assert isinstance(model.callbacks_modules["p"], nn.Linear)


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "kind"),
    [
        ("LARS", None, LARS),
        ("adamw", "CosineAnnealingLR", torch.optim.AdamW),
        (
            {"type": "SGD", "lr": 0.3, "momentum": 0.5},
            {"type": "StepLR", "step_size": 2, "interval": "epoch"},
            torch.optim.SGD,
        ),
        (torch.optim.RMSprop, torch.optim.lr_scheduler.ExponentialLR, torch.optim.RMSprop),
        (
            functools.partial(torch.optim.Adam, lr=1e-2),
            functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3),
            torch.optim.Adam,
        ),
    ],
)
def test_optimizer_and_scheduler_forms(optimizer, scheduler, kind):
    model = make_module()
    probe = OnlineProbe(
        model, "p", "embedding", "label", probe=linear_probe(), optimizer=optimizer, scheduler=scheduler
    )
    make_trainer(max_epochs=2, callbacks=[probe]).fit(model, dict_loader())
    assert isinstance(probe.stepper.optimizer, kind)
    assert probe.stepper.steps == 12


def test_optimizer_and_scheduler_instances():
    model = make_module()
    net = linear_probe()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    probe = OnlineProbe(model, "p", "embedding", "label", probe=net, optimizer=opt, scheduler=sched)
    make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    assert probe.stepper.optimizer is opt and probe.stepper.scheduler is sched
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**6)


def test_epoch_interval_scheduler_steps_per_epoch():
    model = make_module()
    probe = OnlineProbe(
        model,
        "p",
        "embedding",
        "label",
        probe=linear_probe(),
        optimizer={"type": "SGD", "lr": 1.0},
        scheduler={"type": "StepLR", "step_size": 1, "gamma": 0.1, "interval": "epoch"},
    )
    make_trainer(max_epochs=3, callbacks=[probe]).fit(model, dict_loader())
    assert probe.stepper.scheduler.last_epoch == 3
    assert probe.stepper.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32"])
def test_mixed_precision(precision):
    model = make_module(optim={"type": "SGD", "lr": 1e-3})
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=linear_probe(), optimizer={"type": "SGD", "lr": 0.3}
    )
    trainer = make_trainer(max_epochs=2, precision=precision, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    weight = model.callbacks_modules["linear"].weight
    assert torch.isfinite(weight).all()
    assert probe.stepper.steps == 12
    if precision == "bf16-true":
        assert weight.dtype == torch.bfloat16  # the probe follows the module's precision
    else:
        assert weight.dtype == torch.float32
        assert trainer.callback_metrics["eval/linear_top1"] > 0.5


def test_bf16_features_into_fp32_probe_under_precision_32():
    model = make_module()
    probe = OnlineProbe(model, "linear", lambda out, batch: out["embedding"].bfloat16(), "label", probe=linear_probe())
    make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader(), dict_loader(n=16))
    assert model.callbacks_modules["linear"].weight.dtype == torch.float32
    assert probe.stepper.steps == 6


# ---------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_non_finite_batch_is_skipped_counted_and_warned_once(accumulate):
    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx in (2, 4):
                outputs["embedding"] = torch.full_like(outputs["embedding"], math.nan)

    def run(poison: bool):
        model = make_module(optim=None)
        torch.manual_seed(0)
        probe = OnlineProbe(
            model,
            "linear",
            "embedding",
            "label",
            probe=nn.Sequential(nn.BatchNorm1d(D_EMB), linear_probe()),
            optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9},
            accumulate_grad_batches=accumulate,
        )
        callbacks = [Poison(), probe] if poison else [probe]
        loader = dict_loader()
        if not poison:  # the same run without the two poisoned batches
            loader = Batches([b for i, b in enumerate(dict_loader()) if i not in (2, 4)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(max_epochs=2, callbacks=callbacks).fit(model, loader)
        return model, probe, [w for w in caught if "not finite" in str(w.message)]

    model, probe, warned = run(True)
    assert probe.skipped_batches == 4
    assert len(warned) == 1
    reference, _, _ = run(False)
    for (k, got), want in zip(
        model.callbacks_modules.state_dict().items(), reference.callbacks_modules.state_dict().values()
    ):
        torch.testing.assert_close(got, want, msg=k)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_input_key_lists_available_keys():
    model = make_module()
    probe = OnlineProbe(model, "linear", "feats", "label", probe=linear_probe())
    with pytest.raises(
        RuntimeError,
        match=r"input key 'feats' is in neither the step outputs \('loss', 'embedding'|'embedding', 'loss'",
    ):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())


def test_missing_target_key():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "y", probe=linear_probe())
    with pytest.raises(
        RuntimeError, match=r"OnlineProbe\(name='linear'\): target key 'y' is in neither the batch \('x', 'label'\)"
    ):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())


def test_feature_size_mismatch():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(5, NUM_CLASSES))
    with pytest.raises(
        RuntimeError, match=r"have shape \(8, 16\), but the probe expects 5 input features.*in_features=16"
    ):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    model = make_module()
    probe = OnlineProbe(model, "mlp", "embedding", "label", probe=nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))
    with pytest.raises(RuntimeError, match=r"the probe failed on features 'embedding' of shape \(8, 16\)"):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())


def test_a_failed_collective_in_the_probe_is_not_called_a_size_mismatch():
    class Collective(nn.Linear):
        def forward(self, x):
            raise torch.distributed.DistBackendError("gloo: Connection reset by peer")

    model = make_module()
    probe = OnlineProbe(model, "p", "embedding", "label", probe=Collective(D_EMB, NUM_CLASSES))
    with pytest.raises(torch.distributed.DistBackendError, match="Connection reset by peer") as caught:
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    assert "input size" not in str(caught.value)


def test_float_and_out_of_range_targets():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", lambda out, b: b["label"].float(), probe=linear_probe())
    with pytest.raises(RuntimeError, match=r"needs integer class indices as target, got torch.float32.*\.long\(\)"):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, 2))
    with pytest.raises(RuntimeError, match=r"class indices in \[0, 2\).*got values up to 2. Give the probe 3 outputs"):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())


def test_validation_checks_happen_in_sanity_check_before_training():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, 2))
    trainer = make_trainer(max_epochs=1, callbacks=[probe], num_sanity_val_steps=1)
    with pytest.raises(RuntimeError, match="class indices"):
        trainer.fit(model, dict_loader(), dict_loader())
    assert probe.stepper is None  # failed before the first training batch


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer": "Adamm"}, ValueError, r"unknown optimizer 'Adamm'. Did you mean 'Adam'"),
        ({"scheduler": "CosineLR"}, ValueError, r"unknown scheduler 'CosineLR'. Did you mean"),
        (
            {"optimizer": torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)},
            ValueError,
            r"the optimizer SGD was built over other parameters",
        ),
        ({"accumulate_grad_batches": 0}, ValueError, r"accumulate_grad_batches must be a positive int, got 0. Use 1"),
        ({"gradient_clip_val": -1.0}, ValueError, r"gradient_clip_val must be a positive number or None"),
        ({"gradient_clip_algorithm": "l1"}, ValueError, r"gradient_clip_algorithm must be one of"),
        ({"metrics": "accuracy"}, TypeError, r"metrics must be a torchmetrics.Metric"),
        (
            {"metrics": {"top.1": torchmetrics.MeanMetric()}},
            ValueError,
            r"metric names must be non-empty strings without '.'",
        ),
        ({"input": 1.5}, TypeError, r"input must be a key or dotted path"),
        ({"probe": 3}, TypeError, r"probe must be an nn.Module, a callable returning one"),
        ({"scheduler": {"type": "StepLR", "interval": "batch"}}, ValueError, r"scheduler interval must be one of"),
    ],
)
def test_argument_errors_name_the_probe(kwargs, error, match):
    model = make_module()
    args = {"input": "embedding", "target": "label", "probe": linear_probe(), **kwargs}
    with pytest.raises(error, match=r"OnlineProbe\(name='p'\): " + match):
        probe = OnlineProbe(model, "p", **args)
        make_trainer(max_epochs=1, limit_train_batches=1, callbacks=[probe]).fit(model, dict_loader())


def test_duplicate_name_is_an_error():
    model = make_module()
    OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe())
    with pytest.raises(
        ValueError, match=r"the name 'linear' is already used on this Module.*Give each probe its own name"
    ):
        OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe())


@pytest.mark.parametrize("strategy", ["DeepSpeedStrategy", "ModelParallelStrategy", "FSDPStrategy"])
def test_unsupported_or_misconfigured_strategy_errors(strategy):
    # Stand-ins: the real sharding strategies need GPUs to construct. Only the class name is read.
    fake = type(strategy, (), {"kwargs": {}})()
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=linear_probe())
    trainer = types.SimpleNamespace(strategy=fake, world_size=2)
    match = (
        "FSDPStrategy\\(ignored_modules=\\[model.callbacks_modules\\]"
        if strategy == "FSDPStrategy"
        else "is not supported"
    )
    with pytest.raises(RuntimeError, match=r"OnlineProbe\(name='linear'\): .*" + match):
        probe.setup(trainer, model, "fit")
    if strategy == "FSDPStrategy":
        fake.kwargs = {"ignored_modules": [model.callbacks_modules]}
        probe.setup(trainer, model, "fit")  # accepted: the probes stay whole on every process


# ---------------------------------------------------------------------------------------------- pytorch_lightning


def test_works_with_standalone_pytorch_lightning(tmp_path):
    plt = pytest.importorskip("pytorch_lightning")

    class Legacy(plt.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(8, D_EMB)

        def training_step(self, batch, batch_idx):
            emb = self.backbone(batch[0])
            return {"loss": emb.pow(2).mean(), "embedding": emb}

        def validation_step(self, batch, batch_idx):
            return {"embedding": self.backbone(batch[0])}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Legacy()
    probe = OnlineProbe(model, "linear", "embedding", 1, probe=linear_probe())
    trainer = plt.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe, plt.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(model, tuple_loader(), tuple_loader())
    assert {"train/linear_loss", "train/linear_top1", "eval/linear_top1"} <= set(trainer.callback_metrics)
    assert probe.stepper.steps == 12
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert probe.state_key in ckpt["callbacks"]


def test_names_are_unique_across_probe_kinds():
    from sslprobe.callbacks import OnlineKNN, ProbeSweep

    model = make_module()
    OnlineKNN(model, "x", "embedding", "label")
    with pytest.raises(ValueError, match=r"OnlineProbe\(name='x'\): the name 'x' is already used"):
        OnlineProbe(model, "x", "embedding", "label", probe=linear_probe())
    with pytest.raises(ValueError, match=r"ProbeSweep\(name='x'\): the name 'x' is already used"):
        ProbeSweep(model, "x", "embedding", "label", num_classes=NUM_CLASSES)
    OnlineProbe(model, "y", "embedding", "label", probe=linear_probe())
    with pytest.raises(ValueError, match=r"OnlineKNN\(name='y'\): the name 'y' is already used"):
        OnlineKNN(model, "y", "embedding", "label")


def test_split_form_with_one_metric_object_keeps_train_and_eval_apart():
    model = make_module(optim=None)
    acc = torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")
    probe = OnlineProbe(
        model,
        "p",
        "embedding",
        "label",
        probe=linear_probe(),
        optimizer={"type": "SGD", "lr": 0.1},
        metrics={"train": {"acc": acc}, "val": {"acc": acc}},
    )
    trainer = make_trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader(n=24, seed=1))
    x, y = make_xy(24, seed=1)
    with torch.no_grad():
        expected = (model.callbacks_modules["p"](model.backbone(x)).argmax(-1) == y).float().mean().item()
    assert trainer.callback_metrics["eval/p_acc"].item() == pytest.approx(expected)
    assert "train/p_acc" in trainer.callback_metrics


def test_train_loss_reaches_the_logger_at_its_cadence(tmp_path):
    import csv

    model = make_module()
    probe = OnlineProbe(model, "p", "embedding", "label", probe=linear_probe())
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(max_epochs=2, callbacks=[probe], logger=logger, log_every_n_steps=4).fit(model, dict_loader())
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/p_loss")]
    assert steps == [3, 7, 11]  # every 4th of the 12 steps, as Lightning logs an on_step value


def test_target_shape_and_negative_label_errors():
    model = make_module()
    probe = OnlineProbe(model, "p", "embedding", lambda out, b: b["label"].view(-1, 1), probe=linear_probe())
    with pytest.raises(RuntimeError, match=r"one class index per sample, a target of shape \(8,\), got \(8, 1\)"):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    model = make_module()
    probe = OnlineProbe(model, "p", "embedding", lambda out, b: b["label"] - 1, probe=linear_probe())
    with pytest.raises(RuntimeError, match=r"got a negative one \(-1\)"):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())


def test_float16_probe_on_cpu_trains_with_its_own_loss_scale():
    model = make_module(optim={"type": "SGD", "lr": 1e-3})
    probe = OnlineProbe(model, "p", "embedding", "label", probe=linear_probe(), optimizer={"type": "SGD", "lr": 0.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(max_epochs=3, precision="16-true", callbacks=[probe])
        trainer.fit(model, dict_loader(), dict_loader(n=24))
    weight = model.callbacks_modules["p"].weight
    assert weight.dtype == torch.float16 and torch.isfinite(weight).all()
    assert probe.stepper.scaling and trainer.callback_metrics["eval/p_top1"] > 0.5
    skipped = [w for w in caught if "not finite" in str(w.message)]
    assert all("loss scale settling" in str(w.message) for w in skipped)


def fit_under_mixed(precision, trainer_precision="bf16-mixed", **trainer_kw):
    """A linear probe's weights after two epochs under a mixed-precision Trainer, the autocast dtypes its forwards ran
    under (``None``: none), the dtypes of its stored predictions, and the callback."""
    torch.manual_seed(0)
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    probe = OnlineProbe(
        model,
        "p",
        "embedding",
        "label",
        probe=nn.Linear(D_EMB, NUM_CLASSES),
        optimizer="AdamW",
        precision=precision,
    )
    autocasts, stored = [], []

    def record(module, args):
        device = args[0].device.type
        autocasts.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)

    model.callbacks_modules["p"].register_forward_pre_hook(record)

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stored.append(batch["p_preds"].dtype)

    trainer = make_trainer(max_epochs=2, callbacks=[probe, Spy()], precision=trainer_precision, **trainer_kw)
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    return model.callbacks_modules["p"].weight.detach().clone(), set(autocasts), set(stored), probe


def test_under_bf16_mixed_the_probe_runs_under_the_step_autocast_and_agrees_with_float32():
    weight, autocasts, stored, _ = fit_under_mixed(None)
    reference, reference_autocasts, reference_stored, _ = fit_under_mixed("32")
    assert autocasts == {torch.bfloat16} and reference_autocasts == {None}  # the forward's (training and evaluation)
    assert stored == reference_stored == {torch.float32}  # the logits read float32 (loss, metrics, stored)
    assert weight.dtype == reference.dtype == torch.float32  # float32 weights and update either way
    assert not torch.equal(weight, reference)
    torch.testing.assert_close(weight, reference, rtol=0, atol=2e-2 * float(reference.abs().max()))


@pytest.mark.parametrize("value", ["bf16", 32, "64-true"])
def test_precision_argument_is_checked(value):
    with pytest.raises(ValueError, match="precision must be one of"):
        OnlineProbe(make_module(), "p", "embedding", "label", probe=nn.Linear(D_EMB, 3), precision=value)


def test_a_second_fit_in_another_precision_gets_its_own_loss_scale():
    model = make_module()
    probe = OnlineProbe(model, "p", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES), optimizer="AdamW")
    make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    stepper = probe.stepper
    assert not stepper.scaling and float(stepper.loss_scale) == 1.0
    probe.precision = "16-mixed"  # a float16 forward from now on (on a GPU: a 16-mixed Trainer)
    make_trainer(max_epochs=2, callbacks=[probe]).fit(model, dict_loader())
    assert probe.stepper is stepper and stepper.scaling  # the same optimizer state, now with a loss scale
    assert 1.0 < float(stepper.loss_scale) <= 2.0**16 and torch.isfinite(model.callbacks_modules["p"].weight).all()
