from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sslprobe.callbacks import ProbeSweep
from sslprobe.probes import LinearProbe
from tests.callbacks.test_online_probe import FeatureSpy
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, make_module, make_trainer


def reference_head(seen, lr, wd, kind):
    """One LinearProbe trained alone with the head's learning rate and weight decay (no decay on the bias)."""
    probe = LinearProbe(NUM_CLASSES, in_features=D_EMB)
    groups = [
        {"params": [probe.linear.weight], "weight_decay": wd},
        {"params": [probe.linear.bias], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr) if kind == "AdamW" else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    for features, target in seen:
        loss = F.cross_entropy(probe(features), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_every_head_trains_like_its_own_probe(kind):
    model = make_module()
    sweep = ProbeSweep(
        model,
        "sweep",
        "embedding",
        "label",
        num_classes=NUM_CLASSES,
        lrs=[1e-2, 1e-1],
        weight_decays=[0.0, 0.1],
        optimizer=kind,
    )
    spy = FeatureSpy()
    make_trainer(max_epochs=2, callbacks=[spy, sweep]).fit(model, dict_loader())
    bank = model.callbacks_modules["sweep"]
    for h, (lr, wd) in enumerate(sweep.grid):
        ref = reference_head(spy.seen, lr, wd, kind)
        torch.testing.assert_close(bank.weight[h], ref.linear.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bank.bias[h], ref.linear.bias, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bank.norm.running_mean, ref.norm.running_mean)


def test_best_head_and_every_head_logged():
    model = make_module(optim=None)
    sweep = ProbeSweep(model, "sweep", "embedding", "label", num_classes=NUM_CLASSES)
    assert len(sweep.grid) == 16
    trainer = make_trainer(max_epochs=2, callbacks=[sweep])
    trainer.fit(model, dict_loader(), dict_loader(n=24, seed=1))
    metrics = trainer.callback_metrics
    per_head = torch.stack([metrics[f"eval/sweep_{label}_top1"] for label in sweep.head_labels])
    assert metrics["eval/sweep_top1"] == per_head.max()
    assert per_head[sweep.best_head] == per_head.max()
    lr, wd = sweep.grid[sweep.best_head]
    assert metrics["eval/sweep_best_lr"].item() == pytest.approx(lr)
    assert metrics["eval/sweep_best_wd"].item() == pytest.approx(wd)
    assert {"train/sweep_loss", "train/sweep_top1", f"train/sweep_{sweep.head_labels[0]}_loss"} <= set(metrics)
    results = trainer.test(model, dict_loader(n=24, seed=1))
    assert results[0]["test/sweep_top1"] == pytest.approx(metrics["eval/sweep_top1"].item())


def test_sweep_with_user_metrics_and_checkpoint_state():
    import torchmetrics

    model = make_module()
    metric = torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="macro")
    sweep = ProbeSweep(
        model,
        "sweep",
        "embedding",
        "label",
        num_classes=NUM_CLASSES,
        lrs=[0.01, 0.1],
        weight_decays=[0.0],
        optimizer={"type": "LARS", "momentum": 0.9},
        metrics={"macro": metric},
    )
    trainer = make_trainer(max_epochs=1, callbacks=[sweep])
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    assert {"eval/sweep_macro", "eval/sweep_lr0.01_wd0_macro", "eval/sweep_lr0.1_wd0_macro"} <= set(
        trainer.callback_metrics
    )
    state = sweep.state_dict()
    other = ProbeSweep(
        make_module(), "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], weight_decays=[0.0]
    )
    other.load_state_dict(copy.deepcopy(state))
    assert other.best_head == sweep.best_head


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lrs": []}, r"lrs and weight_decays must each hold at least one value"),
        ({"lrs": [0.0]}, r"learning rates must be > 0"),
        ({"optimizer": "Adagrad"}, r"optimizer must be one of \('AdamW', 'SGD', 'LARS'\)"),
        ({"num_classes": 0}, r"num_classes must be a positive int"),
    ],
)
def test_errors(kwargs, match):
    args = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=r"ProbeSweep\(name='s'\): " + match):
        ProbeSweep(make_module(), "s", "embedding", "label", **args)


def test_lars_heads_train_like_the_default_lars_probe():
    from sslprobe import LARS

    model = make_module()
    sweep = ProbeSweep(
        model,
        "sweep",
        "embedding",
        "label",
        num_classes=NUM_CLASSES,
        lrs=[0.1, 1.0],
        weight_decays=[0.0, 1e-3],
        optimizer="LARS",
    )
    spy = FeatureSpy()
    make_trainer(max_epochs=2, callbacks=[spy, sweep]).fit(model, dict_loader())
    bank = model.callbacks_modules["sweep"]
    for h, (lr, wd) in enumerate(sweep.grid):
        probe = LinearProbe(NUM_CLASSES, in_features=D_EMB)
        opt = LARS(
            probe.parameters(), lr=lr, momentum=0.9, eta=0.02, clip_lr=True, exclude_bias_n_norm=True, weight_decay=wd
        )
        for features, target in spy.seen:
            loss = F.cross_entropy(probe(features), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(bank.weight[h], probe.linear.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bank.bias[h], probe.linear.bias, rtol=1e-4, atol=1e-6)


def test_the_sweep_pickles_and_its_copy_builds_the_same_optimizer():
    import io

    sweep = ProbeSweep(
        make_module(), "s", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], optimizer={"type": "SGD"}
    )
    buffer = io.BytesIO()
    torch.save(sweep, buffer)  # ddp_spawn pickles the Trainer's callbacks the same way
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.head_labels == sweep.head_labels and loaded.grid == sweep.grid
    bank = [torch.nn.Parameter(torch.zeros(4, NUM_CLASSES, 8)), torch.nn.Parameter(torch.zeros(4, NUM_CLASSES))]
    built = loaded.optimizer(bank)
    assert built.defaults["kind"] == "SGD" and built.defaults["lrs"].tolist() == [0.01, 0.01, 0.1, 0.1]
    assert [group["decay"] for group in built.param_groups] == [True, False]


@pytest.mark.parametrize("precision", [None, "32"])
def test_the_sweep_follows_the_trainers_bf16_autocast_unless_kept_in_float32(precision):
    model = make_module()
    sweep = ProbeSweep(
        model,
        "sweep",
        "embedding",
        "label",
        num_classes=NUM_CLASSES,
        lrs=[1e-2, 1e-1],
        weight_decays=[0.0],
        precision=precision,
    )
    autocasts = []
    bank = model.callbacks_modules["sweep"]
    bank.register_forward_pre_hook(
        lambda module, args: autocasts.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        )
    )
    trainer = make_trainer(max_epochs=1, callbacks=[sweep], precision="bf16-mixed")
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    # Training and evaluation forwards alike; the weights and their update stay float32.
    assert set(autocasts) == {None if precision == "32" else torch.bfloat16} and len(autocasts) > 6
    assert bank.weight.dtype == torch.float32
    assert "eval/sweep_top1" in trainer.callback_metrics
