from __future__ import annotations

import argparse
import functools
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from sslprobe import Module
from sslprobe.callbacks import OnlineProbe
from tests.conftest import D_EMB, D_IN, NUM_CLASSES, dict_loader, forward, make_module, make_trainer


class Subclassed(Module):
    def forward(self, batch, stage):
        emb = self.backbone(batch["x"])
        return {"embedding": emb, "loss": emb.pow(2).mean()} if stage == "fit" else {"embedding": emb}


def test_forward_passed_or_subclassed_give_the_same_training():
    torch.manual_seed(0)
    a = Module(forward=forward, backbone=nn.Linear(D_IN, D_EMB), optim={"type": "SGD", "lr": 0.1})
    torch.manual_seed(0)
    b = Subclassed(backbone=nn.Linear(D_IN, D_EMB), optim={"type": "SGD", "lr": 0.1})
    for model in (a, b):
        make_trainer(max_epochs=1).fit(model, dict_loader())
    assert torch.equal(a.backbone.weight, b.backbone.weight)
    assert isinstance(a.backbone, nn.Module) and "backbone.weight" in a.state_dict()


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"Module: there is no forward. Pass forward=fn"):
        Module(backbone=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Module: 'callbacks_modules' is reserved"):
        Module(forward=forward, callbacks_modules=nn.ModuleDict())
    with pytest.raises(ValueError, match=r"Module: unknown optim keys \['lr'\]"):
        Module(forward=forward, optim={"optimizer": "SGD", "lr": 0.1})
    with pytest.raises(ValueError, match=r"Module: interval must be one of"):
        Module(forward=forward, optim={"optimizer": "SGD", "scheduler": "StepLR", "interval": "batch"})


@pytest.mark.parametrize(
    ("optim", "kind"),
    [
        ("AdamW", torch.optim.AdamW),
        ({"type": "SGD", "lr": 0.1, "momentum": 0.9}, torch.optim.SGD),
        (functools.partial(torch.optim.Adam, lr=1e-3), torch.optim.Adam),
        (torch.optim.RMSprop, torch.optim.RMSprop),
        ({"optimizer": "SGD", "scheduler": "CosineAnnealingLR"}, torch.optim.SGD),
        (
            {
                "optimizer": {"type": "SGD", "lr": 1.0},
                "scheduler": {"type": "StepLR", "step_size": 1},
                "interval": "epoch",
            },
            torch.optim.SGD,
        ),
    ],
)
def test_optim_forms_and_probes_excluded(optim, kind):
    model = make_module(optim=optim)
    OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    trainer = make_trainer(max_epochs=2, callbacks=[])
    trainer.fit(model, dict_loader())
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, kind)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.backbone.parameters()}
    if isinstance(optim, dict) and optim.get("interval") == "epoch":
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # StepLR(gamma=0.1) stepped twice
    if isinstance(optim, dict) and optim.get("scheduler") == "CosineAnnealingLR":
        assert trainer.lr_scheduler_configs[0].scheduler.T_max == 12


def test_frozen_model_counts_steps_and_stops_at_max_steps():
    model = make_module(optim=None)
    before = model.backbone[0].weight.detach().clone()
    seen = []

    class Spy(OnlineProbe):
        def select_inputs(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["embedding"].requires_grad)
            return super().select_inputs(trainer, pl_module, outputs, batch, batch_idx)

    probe = Spy(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    trainer = make_trainer(max_steps=9, max_epochs=-1, callbacks=[probe])
    trainer.fit(model, dict_loader())
    assert trainer.global_step == 9
    assert probe.stepper.steps == 9
    assert torch.equal(model.backbone[0].weight, before)
    assert seen and not any(seen)  # the frozen forward builds no graph


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_frozen_model_under_reduced_precision(precision):
    model = make_module(optim=None)
    trainer = make_trainer(max_steps=3, max_epochs=-1, precision=precision)
    trainer.fit(model, dict_loader())
    assert trainer.global_step == 3


def test_missing_loss_and_non_dict_errors():
    model = Module(forward=lambda self, b, stage: {"embedding": self.net(b["x"])}, net=nn.Linear(D_IN, 2), optim="SGD")
    with pytest.raises(RuntimeError, match=r"forward returned no 'loss' in stage 'fit', but optim= was given"):
        make_trainer(max_epochs=1).fit(model, dict_loader())
    model = Module(forward=lambda self, b, stage: self.net(b["x"]), net=nn.Linear(D_IN, 2))
    with pytest.raises(TypeError, match=r"forward must return a dict in stage 'validate', got Tensor"):
        make_trainer().validate(model, dict_loader())


def test_containers_move_with_the_module_but_stay_out_of_its_state():
    model = make_module()
    OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    # A checkpoint of the model loads strictly into the model built without probes (the probe's weights travel in
    # its callback's checkpoint state).
    assert sorted(model.state_dict()) == sorted(make_module().state_dict())
    model.to(torch.float64)
    assert model.callbacks_modules["linear"].weight.dtype == torch.float64
    assert model.main_parameters() == list(model.backbone.parameters())


def test_stage_names_reach_forward():
    stages = []

    def record(self, batch, stage):
        stages.append(stage)
        emb = self.net(batch["x"])
        return {"embedding": emb, "loss": emb.sum()}

    model = Module(forward=record, net=nn.Linear(D_IN, 2), optim="SGD")
    trainer = make_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, limit_test_batches=1, limit_predict_batches=1
    )
    trainer.fit(model, dict_loader(), dict_loader())
    trainer.test(model, dict_loader())
    trainer.predict(model, dict_loader())
    assert stages == ["fit", "validate", "test", "predict"]


HPARAMS = {"lr": 1e-3, "batch_size": 256, "tags": ["simclr", "digits"], "augment": {"crop": 0.8}, "note": None}


def fresh_backbone():
    return nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU())


def test_hparams_are_saved_as_save_hyperparameters_would_and_reload(tmp_path):
    model = make_module(hparams=HPARAMS)
    assert dict(model.hparams) == HPARAMS and dict(model.hparams_initial) == HPARAMS
    trainer = make_trainer(max_steps=2, max_epochs=-1)
    trainer.fit(model, dict_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"] == HPARAMS
    # Lightning's name for what load_from_checkpoint passes back as one argument (a private attribute behind it)
    assert checkpoint["hparams_name"] == "hparams"

    reloaded = Module.load_from_checkpoint(path, forward=forward, backbone=fresh_backbone())
    assert dict(reloaded.hparams) == HPARAMS  # not spread into attributes, no forward or backbone added
    assert not hasattr(reloaded, "lr")
    assert torch.equal(reloaded.backbone[0].weight, model.backbone[0].weight)
    # and it checkpoints again (a function or module merged into its hparams would not pickle or reload)
    trainer = make_trainer(max_steps=1, max_epochs=-1)
    trainer.fit(reloaded, dict_loader())
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    assert torch.load(tmp_path / "again.ckpt", weights_only=True)["hyper_parameters"] == HPARAMS


def test_hparams_reach_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = make_module(hparams={"lr": 0.25, "depth": 2})
    make_trainer(max_steps=1, max_epochs=-1, logger=CSVLogger(tmp_path, name="", version="")).fit(model, dict_loader())
    assert sorted((tmp_path / "hparams.yaml").read_text().splitlines()) == ["depth: 2", "lr: 0.25"]


def test_hparams_name_survives_arguments_equal_to_them_or_compared_element_wise(tmp_path):
    np = pytest.importorskip("numpy")
    hparams = {"type": "SGD", "lr": 0.05}
    model = make_module(optim=dict(hparams), hparams=hparams, weights=np.ones(3))
    trainer = make_trainer(max_steps=1, max_epochs=-1)
    trainer.fit(model, dict_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    reloaded = Module.load_from_checkpoint(tmp_path / "model.ckpt", forward=forward, backbone=fresh_backbone())
    assert dict(reloaded.hparams) == hparams


def test_hparams_equal_to_arguments_stay_and_plain_reload_arguments_override_them(tmp_path):
    lr = 0.05
    model = make_module(hparams={"lr": lr, "depth": 2}, lr=lr)  # the same value as an attribute and a hyperparameter
    assert dict(model.hparams) == {"lr": lr, "depth": 2} and model.lr == lr
    trainer = make_trainer(max_steps=1, max_epochs=-1)
    trainer.fit(model, dict_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    # Lightning: keyword arguments of load_from_checkpoint override saved hyperparameters of the same name
    reloaded = Module.load_from_checkpoint(tmp_path / "model.ckpt", forward=forward, backbone=fresh_backbone(), lr=0.5)
    assert dict(reloaded.hparams) == {"lr": 0.5, "depth": 2} and reloaded.lr == 0.5


class WithItsOwnArguments(Module):
    def __init__(self, lr: float = 0.1, depth: int = 2):
        super().__init__(
            forward=forward,
            backbone=fresh_backbone(),
            optim={"type": "SGD", "lr": lr},
            hparams={"lr": lr, "depth": depth},
        )


def test_subclass_reloads_from_its_hparams_alone(tmp_path):
    model = WithItsOwnArguments(lr=0.3, depth=4)
    trainer = make_trainer(max_steps=1, max_epochs=-1)
    trainer.fit(model, dict_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    # its __init__ has no hparams=: Lightning passes the saved keys as its keyword arguments
    reloaded = WithItsOwnArguments.load_from_checkpoint(tmp_path / "model.ckpt")
    assert dict(reloaded.hparams) == {"lr": 0.3, "depth": 4}
    assert torch.equal(reloaded.backbone[0].weight, model.backbone[0].weight)


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(types.MappingProxyType(HPARAMS), id="mapping"),
        pytest.param(argparse.Namespace(**HPARAMS), id="namespace"),
    ],
)
def test_hparams_forms(given):
    model = make_module(hparams=given)
    assert type(model.hparams).__name__ == "AttributeDict" and dict(model.hparams) == HPARAMS


def test_hparams_from_an_omegaconf_config_are_saved_resolved_and_plain(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"lr": 1e-3, "warmup_lr": "${lr}", "augment": {"crop": 0.8}})
    model = make_module(hparams=config)
    expected = {"lr": 1e-3, "warmup_lr": 1e-3, "augment": {"crop": 0.8}}
    assert dict(model.hparams) == expected and type(model.hparams["augment"]) is dict
    trainer = make_trainer(max_steps=1, max_epochs=-1)
    trainer.fit(model, dict_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    assert torch.load(tmp_path / "model.ckpt", weights_only=True)["hyper_parameters"] == expected
    reloaded = Module.load_from_checkpoint(tmp_path / "model.ckpt", forward=forward, backbone=fresh_backbone())
    assert dict(reloaded.hparams) == expected


def test_no_hparams_saves_none():
    model = make_module(hparams={})
    assert dict(model.hparams) == {}
    assert not make_module().hparams


class Opaque:
    pass


@pytest.mark.parametrize(
    ("hparams", "error"),
    [
        ([("lr", 0.1)], r"Module: hparams must be a dict \(or another mapping, an argparse.Namespace or an OmegaConf "),
        ("lr=0.1", r"hparams must be a dict .*got str\. Pass e.g\. hparams=\{'lr': 1e-3"),
        ({1: "a"}, r"Module: hparams keys must be strings, got 1 \(int\)"),
        ({"fn": lambda: 0}, r"Module: hparams\['fn'\] \(a function\) is not a value a checkpoint can hold and reload"),
        (
            {"thing": Opaque()},
            r"hparams\['thing'\] \(a Opaque\) is not .*pass an object the model uses as an attribute ",
        ),
        (
            {"net": nn.Linear(2, 2)},
            r"hparams\['net'\] \(a Linear\) is not a value a checkpoint.*Module\(\.\.\., net=value\)",
        ),
    ],
)
def test_hparams_that_cannot_be_honoured(hparams, error):
    with pytest.raises(TypeError, match=error):
        make_module(hparams=hparams)


@pytest.mark.parametrize("name", ["hparams_initial", "device", "global_step"])
def test_read_only_attribute_names_are_refused(name):
    with pytest.raises(ValueError, match=rf"Module: '{name}' is a read-only attribute of Module; give that"):
        make_module(**{name: 1})


UNTRAINED = "Module: forward returned a 'loss' in stage 'fit', but optim=None, so the main model is not trained"


def untrained_warnings(record):
    return [w for w in record if str(w.message).startswith(UNTRAINED)]


def test_a_loss_without_an_optimizer_warns_once_per_fit_from_its_first_loss():
    calls = []

    def loss_from_the_third_batch(self, batch, stage):
        calls.append(stage)
        emb = self.backbone(batch["x"])
        return {"embedding": emb, "loss": emb.pow(2).mean()} if len(calls) >= 3 else {"embedding": emb}

    class CountWarnings(pl.Callback):
        def __init__(self, record):
            self.record, self.seen = record, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(len(untrained_warnings(self.record)))

    model = Module(forward=loss_from_the_third_batch, backbone=nn.Linear(D_IN, D_EMB))
    before = model.backbone.weight.detach().clone()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # counts every call: once per fit is the module's doing
        counter = CountWarnings(record)
        make_trainer(max_steps=4, max_epochs=-1, callbacks=[counter]).fit(model, dict_loader())
        assert counter.seen == [0, 0, 1, 1]
        make_trainer(max_steps=3, max_epochs=-1).fit(model, dict_loader())
    first, _ = untrained_warnings(record)  # one for each fit
    assert first.category is UserWarning
    assert "give it an optimizer, e.g. Module(..., optim={'type': 'AdamW', 'lr': 1e-3})" in str(first.message)
    assert torch.equal(model.backbone.weight, before)


@pytest.mark.parametrize("case", ["no loss", "optimizer given", "nothing trainable"])
def test_no_untrained_warning_without_a_loss_with_an_optimizer_or_with_nothing_to_train(case):
    if case == "no loss":
        model = Module(forward=lambda self, b, stage: {"embedding": self.net(b["x"])}, net=nn.Linear(D_IN, 2))
    elif case == "optimizer given":
        model = make_module(optim={"type": "SGD", "lr": 0.1})
    else:
        model = make_module(optim=None)
        model.backbone.requires_grad_(False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(max_steps=3, max_epochs=-1).fit(model, dict_loader())
    assert untrained_warnings(record) == []


class NoHostRead(torch.Tensor):
    """A loss whose value must not be read on the host while ``armed`` (``bool()``, ``.item()``, ...)."""

    armed = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if cls.armed and name in ("__bool__", "item", "tolist", "__float__", "__int__", "cpu", "numpy", "__eq__"):
            raise AssertionError(f"the training step read the loss on the host: Tensor.{name}")
        return super().__torch_function__(func, types, args, kwargs)


def test_untrained_warning_reads_no_loss_value():
    def noisy_loss(self, batch, stage):
        emb = self.backbone(batch["x"])
        return {"embedding": emb, "loss": emb.pow(2).mean().as_subclass(NoHostRead)}

    class Armed(Module):
        def training_step(self, batch, batch_idx):
            NoHostRead.armed = True
            try:
                return super().training_step(batch, batch_idx)
            finally:
                NoHostRead.armed = False

    model = Armed(forward=noisy_loss, backbone=nn.Linear(D_IN, D_EMB))
    with pytest.warns(UserWarning, match=UNTRAINED):
        make_trainer(max_steps=3, max_epochs=-1).fit(model, dict_loader())
