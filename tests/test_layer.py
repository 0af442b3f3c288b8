"""sslprobe.Layer: any submodule's output as a probe's input, by a hook, with no extra forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslprobe import Layer, Module
from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep, RefitProbe
from tests.conftest import D_IN, NUM_CLASSES, dict_loader, make_trainer


class Counting(nn.Module):
    """Counts its forward calls (to show that probing a layer adds none)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def explicit_forward(self, batch, stage):
    hidden = self.backbone[0](batch["x"])  # (B, 16), returned explicitly as well
    out = self.backbone[1](hidden)
    result = {"hidden": hidden, "embedding": out}
    if stage == "fit":
        result["loss"] = out.pow(2).mean()
    return result


def make_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(Counting(nn.Linear(D_IN, 16)), nn.ReLU())
    return Module(forward=explicit_forward, backbone=backbone, optim={"type": "SGD", "lr": 0.05})


def test_a_layer_probe_trains_as_the_same_probe_fed_the_activations_explicitly():
    model = make_model()
    seed_probe = nn.Linear(16, NUM_CLASSES)
    by_layer = OnlineProbe(model, "layer", Layer("backbone.0"), "label", probe=seed_probe, optimizer="AdamW")
    by_key = OnlineProbe(model, "key", "hidden", "label", probe=nn.Linear(16, NUM_CLASSES), optimizer="AdamW")
    model.callbacks_modules["key"].load_state_dict(model.callbacks_modules["layer"].state_dict())
    knn = OnlineKNN(model, "knn", Layer("backbone.0"), "label", k=3)
    refit = RefitProbe(model, "refit", Layer("backbone.0"), "label", num_classes=NUM_CLASSES)
    sweep = ProbeSweep(model, "sweep", Layer("backbone.0"), "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1])
    trainer = make_trainer(max_epochs=2, callbacks=[by_layer, by_key, knn, refit, sweep])
    trainer.fit(model, dict_loader(), dict_loader())
    for a, b in zip(model.callbacks_modules["layer"].parameters(), model.callbacks_modules["key"].parameters()):
        assert torch.equal(a, b)
    metrics = trainer.callback_metrics
    assert metrics["eval/layer_top1"] == metrics["eval/key_top1"]
    assert {"eval/knn_top1", "eval/refit_top1", "eval/sweep_top1"} <= set(metrics)
    # One hook for five readers, and no extra forward pass: 6 training + 6 validation batches a epoch, 2 epochs.
    assert len(model.backbone[0]._forward_hooks) == 1
    assert model.backbone[0].calls == 2 * (6 + 6)


def tokens_forward(self, batch, stage):
    tokens = self.backbone(batch["x"]).view(-1, 4, 4)  # (B, N=4, D=4): token 0 a CLS token, then 3 patches
    return {"tokens": self.blocks(tokens)}


@pytest.mark.parametrize(
    ("pool", "prefix", "expected"),
    [
        ("cls", 0, lambda t: t[:, 0]),
        ("mean", 1, lambda t: t[:, 1:].mean(1)),
        ("auto", 0, lambda t: t.mean(1)),
        (None, 0, lambda t: t),
    ],
)
def test_token_pooling(pool, prefix, expected):
    torch.manual_seed(0)
    model = Module(forward=tokens_forward, backbone=nn.Linear(D_IN, 16), blocks=nn.Sequential(nn.Identity()))
    layer = Layer("blocks.0", pool=pool, prefix_tokens=prefix)
    seen = []
    probe = OnlineProbe(
        model,
        "p",
        lambda out, b: seen.append((layer(out, b), out["tokens"])) or layer(out, b),
        "label",
        probe=nn.Sequential(nn.Flatten(), nn.Linear(16, NUM_CLASSES)) if pool is None else nn.Linear(4, NUM_CLASSES),
        loss_fn=lambda p, t: p.sum(),
        metrics={},
    )
    layer.attach(model, "test")
    make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[probe]).fit(model, dict_loader())
    for got, tokens in seen:
        torch.testing.assert_close(got, expected(tokens))


def test_a_conv_map_is_averaged_over_space_and_the_first_call_of_a_step_is_kept():
    def two_views(self, batch, stage):
        x = batch["x"].view(-1, 2, 2, 2)
        first = self.conv(x)
        self.conv(x * 10)  # a second view through the same layer: not what the probe reads
        return {"first": first.mean(dim=(2, 3))}

    torch.manual_seed(0)
    model = Module(forward=two_views, conv=nn.Conv2d(2, 3, 1))
    a = OnlineProbe(model, "a", Layer("conv"), "label", probe=nn.Linear(3, NUM_CLASSES), optimizer="SGD")
    b = OnlineProbe(model, "b", "first", "label", probe=nn.Linear(3, NUM_CLASSES), optimizer="SGD")
    model.callbacks_modules["b"].load_state_dict(model.callbacks_modules["a"].state_dict())
    make_trainer(max_epochs=1, callbacks=[a, b]).fit(model, dict_loader())
    for p, q in zip(model.callbacks_modules["a"].parameters(), model.callbacks_modules["b"].parameters()):
        torch.testing.assert_close(p, q)


def test_an_unknown_path_lists_close_matches():
    model = make_model()
    with pytest.raises(ValueError, match=r"no submodule 'backbone.00'.*'backbone.0'"):
        OnlineProbe(model, "p", Layer("backbone.00"), "label", probe=nn.Linear(16, NUM_CLASSES))


def test_wrapper_prefixes_are_not_needed_and_bad_arguments_are_named():
    assert Layer("module._orig_mod.backbone.0").path == "backbone.0"
    with pytest.raises(ValueError, match="pool must be one of"):
        Layer("x", pool="max")
    with pytest.raises(ValueError, match="prefix_tokens must be an int >= 0"):
        Layer("x", prefix_tokens=-1)


def test_a_model_compiled_after_the_callbacks_are_built_still_feeds_its_layers():
    model = make_model()
    by_layer = OnlineProbe(model, "layer", Layer("backbone.0"), "label", probe=nn.Linear(16, NUM_CLASSES))
    by_key = OnlineProbe(model, "key", "hidden", "label", probe=nn.Linear(16, NUM_CLASSES))
    model.callbacks_modules["key"].load_state_dict(model.callbacks_modules["layer"].state_dict())
    try:
        model.backbone = torch.compile(model.backbone, backend="eager")  # dynamo only: no compiler needed
    except Exception as err:  # a platform torch.compile does not support
        pytest.skip(f"torch.compile unavailable: {err}")

    def compiled_forward(self, batch, stage):
        out = self.backbone(batch["x"])
        hidden = self.backbone._orig_mod[0].inner(batch["x"])  # the same activations, by hand (not counted)
        result = {"hidden": hidden, "embedding": out}
        if stage == "fit":
            result["loss"] = out.pow(2).mean()
        return result

    model._forward_fn = compiled_forward
    make_trainer(max_epochs=1, callbacks=[by_layer, by_key]).fit(model, dict_loader())
    for a, b in zip(model.callbacks_modules["layer"].parameters(), model.callbacks_modules["key"].parameters()):
        torch.testing.assert_close(a, b)


def test_health_callbacks_read_a_layer():
    from sslprobe.callbacks import RankMe

    model = make_model()
    by_layer = RankMe(model, "rank_layer", Layer("backbone.0"), queue_size=48)
    by_key = RankMe(model, "rank_key", "hidden", queue_size=48)
    trainer = make_trainer(max_epochs=1, callbacks=[by_layer, by_key])
    trainer.fit(model, dict_loader(), dict_loader())
    assert trainer.callback_metrics["eval/rank_layer"] == pytest.approx(
        trainer.callback_metrics["eval/rank_key"].item()
    )
