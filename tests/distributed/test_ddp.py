"""Probes under Lightning DDP with 2 CPU processes (gloo), against single-process references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Subset

from sslprobe.callbacks import OnlineProbe, RefitProbe
from sslprobe.probes.knn import knn_predict
from sslprobe.probes.linear_bank import LinearHeadBank
from sslprobe.probes.ridge import DEFAULT_LAMBDAS, RidgeStatistics, fit_ridge
from tests.callbacks.test_refit_probe import ResumableBatches, batches_of
from tests.conftest import DictDataset, make_trainer, make_xy
from tests.distributed.common import NUM_CLASSES, build_module, health_callbacks, linear_probe, loader

WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATOR = os.environ.get("SSLPROBE_TEST_ACCELERATOR", "cpu")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or (ACCELERATOR == "gpu" and torch.cuda.device_count() < 2),
    reason="needs torch.distributed (and 2 GPUs for the GPU variant)",
)


def run_worker(scenario: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(WORKER), scenario, str(out), "--accelerator", ACCELERATOR, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=WORKER.parents[2])
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    return run_worker("train", tmp_path_factory.mktemp("ddp") / "train.pt")


def test_every_rank_holds_identical_probes_after_every_step(trained):
    assert trained["world_size"] == 2
    assert len(trained["per_step"]) == 12
    assert trained["max_diff"] == 0.0


def test_no_collective_per_step_beyond_the_gradient_all_reduce(trained):
    # Per step: one gradient all-reduce per probe (bn, sweep, and linear, whose window of 2 batches closes on the
    # device's count of finite batches, so its gradients travel every batch), one reduction per probe's logged loss
    # on the steps the logger records (every 3rd), and at the first step the broadcast of the lazily built sweep
    # bank (float and integer tensors). Nothing else.
    expected = [3 + (3 if (i + 1) % 3 == 0 else 0) + (2 if i == 0 else 0) for i in range(12)]
    assert trained["per_step"] == expected


def test_eval_metrics_cover_the_whole_validation_set(trained):
    probe = nn.Linear(16, NUM_CLASSES)
    probe.load_state_dict({k.split(".", 1)[1]: v for k, v in trained["weights"].items() if k.startswith("linear.")})
    model = build_module(trainable=True)
    x_va, y_va = make_xy(24, seed=1)
    x_tr, y_tr = make_xy(48)
    with torch.no_grad():
        accuracy = (probe(model.backbone(x_va)).argmax(1) == y_va).float().mean().item()
        knn = knn_predict(model.backbone(x_va), model.backbone(x_tr), y_tr, NUM_CLASSES, k=5, temperature=0.1)
    assert trained["metrics"]["eval/linear_top1"] == pytest.approx(accuracy)
    # the kNN bank held both processes' features: the whole training set
    assert trained["knn_bank_size"] == 24
    assert trained["metrics"]["eval/knn_top1"] == pytest.approx((knn.argmax(1) == y_va).float().mean().item())


def test_eval_normalisation_statistics_cover_every_rank(trained):
    # The sweep's bank normalises each validation batch with the statistics of every row seen so far in the
    # evaluation, on all ranks: as one process whose batches are the two ranks' batches together (8 rows).
    bank = LinearHeadBank(2, NUM_CLASSES, in_features=16)
    bank.load_state_dict({k.split(".", 1)[1]: v for k, v in trained["weights"].items() if k.startswith("sweep.")})
    bank.eval()
    model = build_module(trainable=True)
    x_va, y_va = make_xy(24, seed=1)
    with torch.no_grad():
        logits = torch.cat([bank(model.backbone(x_va[i : i + 8])) for i in range(0, 24, 8)], dim=1)  # (H, 24, C)
    accuracy = (logits.argmax(-1) == y_va).float().mean(1)
    assert trained["metrics"]["eval/sweep_top1"] == pytest.approx(accuracy.max().item())
    assert trained["metrics"]["eval/sweep_lr0.01_wd0_top1"] == pytest.approx(accuracy[0].item())


def test_accumulation_and_clipping_match_one_process_with_the_same_total_batch(trained):
    model = build_module(trainable=True)
    probe = linear_probe(model, accumulate_grad_batches=2, gradient_clip_val=0.05)
    make_trainer(max_epochs=2, callbacks=[probe]).fit(model, loader(48, batch_size=8))
    for key, value in model.callbacks_modules["linear"].state_dict().items():
        torch.testing.assert_close(trained["weights"][f"linear.{key}"], value, rtol=1e-5, atol=1e-6)
    assert trained["steps"] == probe.stepper.steps == 6


def test_sweep_and_knn_and_all_probes_logged(trained):
    metrics = trained["metrics"]
    assert {"eval/sweep_top1", "eval/bn_top1", "train/sweep_loss", "eval/knn_top1"} <= set(metrics)


def test_checkpoint_from_two_processes_resumes_on_one_and_back(tmp_path):
    written = run_worker("checkpoint", tmp_path / "two.pt")
    assert written["batches"] == 2  # 6 global batches per epoch, accumulate 4: a half-full window is saved
    ckpt = tmp_path / "ddp.ckpt"
    assert ckpt.exists()
    model = build_module(trainable=True)
    probe = linear_probe(model, accumulate_grad_batches=4)
    make_trainer(max_epochs=2, callbacks=[probe]).fit(model, loader(48, batch_size=8), ckpt_path=str(ckpt))
    assert probe.stepper.steps == 3 and probe.stepper.batches == 0  # 1 + (2 + 6) // 4 more steps

    one = tmp_path / "one"
    model = build_module(trainable=True)
    probe = linear_probe(model, accumulate_grad_batches=4)
    saver = ModelCheckpoint(dirpath=one, filename="one")
    make_trainer(max_epochs=1, callbacks=[probe, saver], enable_checkpointing=True).fit(model, loader(48, batch_size=8))
    resumed = run_worker("checkpoint", tmp_path / "resumed.pt", "--ckpt", str(one / "one.ckpt"))
    assert resumed["steps"] == 1 + (2 + 12) // 4 and resumed["batches"] == (2 + 12) % 4


def test_frozen_main_model_under_ddp(tmp_path):
    result = run_worker("frozen", tmp_path / "frozen.pt")
    assert result["global_step"] == 6 and result["steps"] == 6
    assert result["max_diff"] == 0.0


@pytest.mark.skipif(ACCELERATOR != "gpu", reason="Lightning's FSDP needs CUDA GPUs")
def test_fsdp_keeps_probes_whole_and_in_sync(tmp_path):
    result = run_worker("fsdp", tmp_path / "fsdp.pt")
    assert result["max_diff"] == 0.0
    assert result["steps"] == 12
    assert result["weights"]["linear.weight"].shape == (NUM_CLASSES, 16)  # whole, not a shard
    assert "eval/linear_top1" in result["metrics"]


def test_a_non_finite_batch_on_one_rank_skips_the_global_batch_everywhere(tmp_path):
    from tests.callbacks.test_online_probe import Batches

    result = run_worker("poison", tmp_path / "poison.pt")
    assert result["max_diff"] == 0.0
    # one process with the total batch, the poisoned global batch left out
    model = build_module(trainable=True)
    probe = linear_probe(model, accumulate_grad_batches=2)
    batches = Batches([b for i, b in enumerate(loader(48, batch_size=8)) if i != 3])
    make_trainer(max_epochs=1, callbacks=[probe]).fit(model, batches)
    for key, value in model.callbacks_modules["linear"].state_dict().items():
        torch.testing.assert_close(result["weights"][f"linear.{key}"], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- RefitProbe


@pytest.fixture(scope="module")
def refit_run(tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("refit")
    return run_worker("refit", folder / "refit.pt"), folder


def one_process_refit(ckpt_path: str | None = None):
    """The reference: one process whose batches of 8 hold both processes' batches of 4."""
    model = build_module(trainable=True)
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES)
    x, y = make_xy(48)
    trainer = make_trainer(max_epochs=2, callbacks=[refit])
    trainer.fit(model, ResumableBatches(batches_of(x, y, 8)), loader(24, batch_size=8, seed=1), ckpt_path=ckpt_path)
    return refit, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/refit")}


def test_refit_under_ddp_equals_one_process_holding_the_whole_batch(refit_run):
    result, _ = refit_run
    # No collective in a training step but the first (the shift of the statistics, broadcast once); one per
    # validation (the statistics of both processes, summed).
    assert result["per_step"] == [1] + [0] * 11
    assert result["per_validation"] == [1, 1]
    refit, logged = one_process_refit()
    last = result["fits"][-1]
    assert last["rows"] == refit.last_fit.rows == 48
    torch.testing.assert_close(last["weight"], refit.last_fit.weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(last["bias"], refit.last_fit.bias, rtol=1e-9, atol=1e-12)
    assert {k: last[k] for k in logged} == pytest.approx(logged)
    assert set(logged) == {"eval/refit_top1", "eval/refit_lambda"}


def test_a_mid_epoch_checkpoint_of_two_processes_holds_the_rows_of_both(refit_run):
    _, folder = refit_run
    checkpoint = torch.load(folder / "refit-step=4.ckpt", weights_only=True)
    state = checkpoint["callbacks"]["RefitProbe{'name': 'refit'}"]
    stats = RidgeStatistics.from_buffer(state["statistics"], state["shift"], NUM_CLASSES)
    assert stats.counts.tolist() == [32.0, 0.0, 0.0, 32.0]  # 4 steps x 2 processes x 4 rows
    model = build_module(trainable=True)
    x, y = make_xy(48)
    with torch.no_grad():
        features = model.backbone(x[:32])
    expected = RidgeStatistics(features.shape[1], NUM_CLASSES)
    expected.update(features, y[:32])
    fit, reference = fit_ridge(stats, DEFAULT_LAMBDAS), fit_ridge(expected, DEFAULT_LAMBDAS)
    assert fit.lambda_ == reference.lambda_
    torch.testing.assert_close(fit.weight, reference.weight, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_two_process_checkpoint_resumed_mid_epoch_refits_as_the_uninterrupted_run(refit_run, tmp_path, processes):
    result, folder = refit_run
    ckpt = str(folder / "refit-step=4.ckpt")
    if processes == 2:
        resumed = run_worker("refit", tmp_path / "resumed.pt", "--ckpt", ckpt)
        assert len(resumed["fits"]) == len(result["fits"]) == 2
        for got, expected in zip(resumed["fits"], result["fits"]):
            assert got["rows"] == expected["rows"] == 48  # process 1 did not count the checkpoint's rows again
            torch.testing.assert_close(got["weight"], expected["weight"], rtol=1e-9, atol=1e-12)
            assert {k: v for k, v in got.items() if k.startswith("eval/")} == pytest.approx(
                {k: v for k, v in expected.items() if k.startswith("eval/")}
            )
    else:
        refit, logged = one_process_refit(ckpt)
        last = result["fits"][-1]
        assert refit.last_fit.rows == 48
        torch.testing.assert_close(refit.last_fit.weight, last["weight"], rtol=1e-9, atol=1e-12)
        assert logged == pytest.approx({k: last[k] for k in logged})


def test_ddp_spawn_pickles_lazy_probes_a_sweep_and_a_knn_and_logs_the_right_numbers(tmp_path):
    from sslprobe.probes import LinearProbe
    from sslprobe.probes.linear_bank import LinearHeadBank

    result = run_worker("spawn", tmp_path / "spawn.pt")
    assert result["world_size"] == 2 and not result["main_process_initialized"]  # it ran in 2 new processes
    metrics, weights = result["metrics"], result["weights"]
    model = build_module(trainable=True)  # lr 0: the backbone the workers had
    x_va, y_va = make_xy(24, seed=1)
    x_tr, y_tr = make_xy(48)

    def offline(probe: nn.Module) -> torch.Tensor:
        """Top-1 of ``probe`` (a fresh evaluation) over the validation set, in the global batches of 8 of 2 ranks."""
        probe.train().eval()
        with torch.no_grad():
            preds = torch.cat([probe(model.backbone(x)) for x in x_va.split(8)], dim=-2)  # (..., 24, C)
        return (preds.argmax(-1) == y_va).float().mean(-1)

    # The lazy probe came back to the main process built (16 -> 3) and trained as one process would: each rank's
    # 4 rows normalised with their own statistics, the step on the mean gradient of both ranks' batches.
    linear = LinearProbe(NUM_CLASSES, in_features=16)
    linear.load_state_dict({k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith("linear.")})
    reference = build_module(trainable=True)
    probe = OnlineProbe(
        reference, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES), accumulate_grad_batches=2
    )
    order = [i for start in range(0, 48, 8) for rank in (0, 1) for i in range(start + rank, start + 8, 2)]
    by_rank = DataLoader(Subset(DictDataset(x_tr, y_tr), order), batch_size=4)
    one = make_trainer(max_epochs=2, callbacks=[probe])
    one.fit(reference, by_rank, loader(24, batch_size=8, seed=1))
    for key in ("linear.weight", "linear.bias"):
        torch.testing.assert_close(weights[f"linear.{key}"], reference.callbacks_modules["linear"].state_dict()[key])
    assert metrics["train/linear_top1"] > 0.9
    assert metrics["eval/linear_top1"] == pytest.approx(float(offline(linear)))
    assert metrics["eval/linear_top1"] == pytest.approx(float(one.callback_metrics["eval/linear_top1"]))

    # The sweep's best head and every head are logged with the numbers of the weights it came back with.
    bank = LinearHeadBank(2, NUM_CLASSES, in_features=16)
    bank.norm.load_state_dict({k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith("sweep.norm.")})
    with torch.no_grad():
        bank.weight.copy_(weights["sweep.weight"])  # (H, C, D), as saved (a plain dict carries no layout version)
        bank.bias.copy_(weights["sweep.bias"])
    heads = offline(bank)
    assert metrics["train/sweep_top1"] > 0.9
    assert metrics["eval/sweep_top1"] == pytest.approx(float(heads.max()))
    assert metrics["eval/sweep_lr0.01_wd0_top1"] == pytest.approx(float(heads[0]))
    assert metrics["eval/sweep_lr0.1_wd0_top1"] == pytest.approx(float(heads[1]))

    # The kNN voted over both processes' training rows.
    with torch.no_grad():
        knn = knn_predict(model.backbone(x_va), model.backbone(x_tr), y_tr, NUM_CLASSES, k=5, temperature=0.1)
    assert metrics["eval/knn_top1"] == pytest.approx((knn.argmax(1) == y_va).float().mean().item())


def test_freeze_before_fit_under_ddp_trains_the_probes(tmp_path):
    result = run_worker("freeze", tmp_path / "freeze.pt")
    assert result["backbone_frozen"] and result["steps"] == 6
    assert result["max_diff"] == 0.0
    model = build_module(trainable=False)
    probe = linear_probe(model, optimizer={"type": "SGD", "lr": 0.1})
    make_trainer(max_steps=6, callbacks=[probe]).fit(model, loader(48, batch_size=8))
    for key, value in model.callbacks_modules["linear"].state_dict().items():
        torch.testing.assert_close(result["weights"][f"linear.{key}"], value, rtol=1e-5, atol=1e-6)


def test_a_layer_input_under_ddp_trains_as_the_returned_embedding(tmp_path):
    result = run_worker("layer", tmp_path / "layer.pt")
    weights = result["weights"]
    for key in ("weight", "bias"):
        assert torch.equal(weights[f"layer.{key}"], weights[f"linear.{key}"])
    assert result["metrics"]["eval/layer_top1"] == result["metrics"]["eval/linear_top1"]


def test_health_under_ddp_equals_one_process_holding_the_whole_batch(tmp_path):
    result = run_worker("health", tmp_path / "health.pt")
    assert result["world_size"] == 2
    assert result["per_step"] == [0] * 6  # a training step only appends rows: no collective
    first, second = result["per_rank"]
    assert first == second  # every rank logs the same value (EarlyStopping/ModelCheckpoint may monitor it)
    assert set(first) == {"eval/rankme", "eval/alpha", "eval/rankme_val", "eval/lidar"}
    model = build_module(trainable=True)
    trainer = make_trainer(callbacks=health_callbacks(model))
    trainer.fit(model, loader(48, batch_size=8), loader(24, batch_size=8, seed=1))
    # Each rank keeps 32 // 2 of its rows for RankMe: the newest 32 samples in all, as one process with queue 32.
    for key, value in first.items():
        assert value == pytest.approx(trainer.callback_metrics[key].item(), rel=1e-4), key


def test_health_and_knn_when_one_rank_has_no_validation_row(tmp_path):
    # Rank 0 holds the whole validation set and rank 1 none (an unsized set smaller than the world): every
    # gather and metric reduction still meets on both ranks, and both log what one process would.
    from sslprobe.callbacks import OnlineKNN

    result = run_worker("health_empty_rank", tmp_path / "empty.pt")
    assert result["world_size"] == 2 and result["validations"] == 2
    first, second = result["per_rank"]
    assert first == second
    model = build_module(trainable=True)
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1, num_classes=NUM_CLASSES)
    trainer = make_trainer(callbacks=[*health_callbacks(model), knn], max_epochs=2)
    trainer.fit(model, loader(48, batch_size=8), loader(24, batch_size=8, seed=1))
    assert set(first) == {"eval/rankme", "eval/alpha", "eval/rankme_val", "eval/lidar", "eval/knn_top1"}
    for key, value in first.items():
        assert value == pytest.approx(trainer.callback_metrics[key].item(), rel=1e-4), key


def test_a_second_validation_loader_empty_on_one_rank(tmp_path):
    # Rank 1 never sees a batch of the second loader: it still holds that loader's metrics, so every reduction
    # meets; both ranks log the same numbers, and the kNN's equal one process holding both loaders whole.
    from sslprobe.callbacks import OnlineKNN

    result = run_worker("second_loader_empty_rank", tmp_path / "second.pt")
    assert result["world_size"] == 2 and result["validations"] == 2
    first, second = result["per_rank"]
    assert first == second
    assert set(first) == {f"eval/{name}_top1/dataloader_idx_{i}" for name in ("p", "knn") for i in (0, 1)}
    model = build_module(trainable=True)
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1, num_classes=NUM_CLASSES)
    trainer = make_trainer(callbacks=[knn], max_epochs=2)
    trainer.fit(model, loader(48, batch_size=8), [loader(24, batch_size=8, seed=1)] * 2)
    for i in (0, 1):
        key = f"eval/knn_top1/dataloader_idx_{i}"
        assert first[key] == pytest.approx(trainer.callback_metrics[key].item(), rel=1e-6), key
