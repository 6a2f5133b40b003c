"""The encoder on its own: straight-through gradients, beta, LightGCN, training and checkpoints."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import torch

from binllm_core.codes import embeddings_table
from binllm_core.config import EncoderConfig
from binllm_core.encoder.data import normalized_adjacency, split_samples, train_graph
from binllm_core.encoder.model import BINARY, FLOAT, sign_ste
from binllm_core.encoder.training import (
    EncoderTraining,
    beta_at,
    ema_decay_at,
    evaluate,
    fit,
    lr_factor,
)
from binllm_core.errors import ConfigError
from tests.builders import planted_samples

PLANTED = EncoderConfig(
    dim=16,
    lr=1e-2,
    weight_decay=1e-3,
    float_lr=3e-2,
    float_weight_decay=1e-3,
    batch_size=256,
    max_epochs=30,
    patience=8,
    beta_step=0.1,
    seed=7,
)


def test_sign_forward_and_straight_through_gradient_reaches_embeddings() -> None:
    x = torch.tensor([-0.5, 0.0, 0.3], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, 1.0, 1.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]

    training = EncoderTraining(EncoderConfig(dim=8, beta_step=1.0), 5, 6)
    model = training.models.models[BINARY]
    model.eval()  # fully binary codes: the only way to the embeddings is the straight-through
    logits = model(torch.tensor([1, 2]), torch.tensor([3, 4]))
    logits.sum().backward()
    user_grad = model.backbone.user_emb.weight.grad
    assert user_grad[1].abs().sum() > 0 and user_grad[2].abs().sum() > 0
    assert user_grad[0].abs().sum() == 0  # padding
    assert model.proj_u.weight.grad.abs().sum() > 0


def test_beta_schedule() -> None:
    assert [beta_at(e, 0.25) for e in range(8)] == [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]
    assert beta_at(100, 0.25) == 1.0


def test_normalized_adjacency() -> None:
    adj = normalized_adjacency(3, 3, np.array([1, 1, 2]), np.array([1, 2, 2])).to_dense()
    # user 1 (degree 2) - item 2 (node 5, degree 2): 1/sqrt(2*2)
    assert adj[1, 5] == pytest.approx(0.5) and adj[5, 1] == pytest.approx(0.5)
    assert adj[2, 5] == pytest.approx(1 / np.sqrt(2))
    assert adj[0].abs().sum() == 0 and torch.allclose(adj, adj.T)


def test_dim_must_be_octets() -> None:
    with pytest.raises(ConfigError):
        EncoderTraining(EncoderConfig(dim=12), 3, 3)


@pytest.mark.parametrize("backbone", ["mf", "lightgcn"])
def test_planted_groups_reach_high_test_auc(backbone: str) -> None:
    table = planted_samples()
    data = split_samples(table)
    cfg = dataclasses.replace(PLANTED, backbone=backbone)
    training = fit(cfg, data, 101, 61)
    assert training.best[BINARY]["test"]["auc"] > 0.9
    assert training.best[FLOAT]["test"]["auc"] > 0.9
    users, items = training.signs()
    assert users.shape == (101, 16) and set(np.unique(users)) <= {-1.0, 1.0}
    # The exported embeddings (soft tokens read them): the codes are the relaxed vectors' signs.
    vectors = training.vectors()
    np.testing.assert_array_equal(np.sign(vectors["relaxed"][0][1:]), users[1:])
    np.testing.assert_array_equal(np.sign(vectors["relaxed"][1][1:]), items[1:])
    assert vectors["float"][0].shape[0] == 101 and vectors["float"][1].shape[0] == 61


def test_same_seed_same_codes_and_exact_resume(tmp_path) -> None:
    data = split_samples(planted_samples(seed=1))
    # cosine: the learning rates are a function of the epoch; the average resumes its steps
    cfg = dataclasses.replace(
        PLANTED, max_epochs=6, patience=6, lr_schedule="cosine", ema_decay=0.9
    )
    first = fit(cfg, data, 101, 61)
    again = fit(cfg, data, 101, 61)
    np.testing.assert_array_equal(first.signs()[0], again.signs()[0])
    np.testing.assert_array_equal(first.signs()[1], again.signs()[1])

    # Three epochs, a checkpoint, a fresh object that resumes: the same run as without a stop.
    straight = EncoderTraining(cfg, 101, 61)
    stopped = EncoderTraining(cfg, 101, 61)
    for _ in range(3):
        stopped.train_epoch(data["train"])
        stopped.validate(data["valid"])
    stopped.save(tmp_path)
    resumed = EncoderTraining(cfg, 101, 61)
    resumed.load(tmp_path)
    assert resumed.epoch == 2 and resumed.best_epoch == stopped.best_epoch
    for _ in range(6):
        straight.train_epoch(data["train"])
        straight.validate(data["valid"])
    while not resumed.finished:
        resumed.train_epoch(data["train"])
        resumed.validate(data["valid"])
    for key, value in straight.weights().items():
        torch.testing.assert_close(resumed.weights()[key], value, rtol=0, atol=0)


def test_float_only_and_graph() -> None:
    table = planted_samples(seed=2)
    data = split_samples(table)
    users, items = train_graph(data["train"])
    assert (data["train"].labels[data["train"].users == users[0]] > 0).any()
    cfg = dataclasses.replace(PLANTED, binary=False, max_epochs=3)
    training = fit(cfg, data, 101, 61)
    assert set(training.models.models) == {FLOAT} and training.primary == FLOAT
    signs = training.signs()[0]
    expected = np.where(training.models.models[FLOAT].backbone.user_emb.weight.detach() >= 0, 1, -1)
    np.testing.assert_array_equal(signs, expected)


def test_float_init_std() -> None:
    training = EncoderTraining(EncoderConfig(dim=32, float_init_std=0.1), 400, 300)
    backbone = training.models.models[FLOAT].backbone
    assert backbone.user_emb.weight[1:].std().item() == pytest.approx(0.1, rel=0.1)
    assert backbone.item_emb.weight[0].abs().sum() == 0
    binary = training.models.models[BINARY].backbone
    assert binary.user_emb.weight[1:].std().item() == pytest.approx(1.0, rel=0.1)


def test_cosine_schedule_falls_from_each_learning_rate_to_zero() -> None:
    cfg = dataclasses.replace(PLANTED, max_epochs=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == 1.0 and lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(9, cfg) == pytest.approx(0.0245, abs=1e-3)
    assert lr_factor(9, dataclasses.replace(cfg, lr_schedule="constant")) == 1.0
    training = EncoderTraining(cfg, 101, 61)
    data = split_samples(planted_samples(seed=1))
    for _ in range(6):
        training.train_epoch(data["train"])
    rates = [group["lr"] for group in training.optimizer.param_groups]
    assert rates == pytest.approx([cfg.lr * lr_factor(5, cfg), cfg.float_lr * lr_factor(5, cfg)])


def test_prior_bits_are_one_for_users_and_learn_which_items_everyone_likes() -> None:
    samples = planted_samples(seed=2)
    popular = pa.compute.less_equal(samples["iid"], 6)  # items 1-6: liked by every user
    labels = pa.compute.if_else(popular, pa.scalar(1, pa.int8()), samples["label"])
    data = split_samples(
        samples.set_column(samples.schema.get_field_index("label"), "label", labels)
    )
    cfg = dataclasses.replace(
        PLANTED, objective="implicit", prior_bits=8, weight_decay=0.0, max_epochs=20, patience=20
    )
    training = fit(cfg, data, 101, 61)
    users, items = training.signs()
    assert users.shape[1] == items.shape[1] == 16
    assert (users[:, -8:] == 1).all()  # every user's prior bits: the item's count of 1s counts
    prior = (items[:, -8:] == 1).sum(1)
    assert prior[1:7].mean() >= prior[7:].mean() + 1.5, prior
    # The codes are what the model scores by: inner products of the signs.
    model = training.models.models[BINARY]
    pairs = np.array([1, 2, 3]), np.array([1, 30, 60])
    np.testing.assert_allclose(model.predict(*pairs), (users[pairs[0]] * items[pairs[1]]).sum(1))


def test_prior_bits_leave_most_bits_projected() -> None:
    with pytest.raises(ConfigError, match="prior_bits = 16 is not between 0 and encoder.dim - 1"):
        EncoderTraining(EncoderConfig(dim=16, prior_bits=16), 5, 6)


def test_codes_can_be_longer_than_the_embeddings_they_are_projected_from() -> None:
    data = split_samples(planted_samples())
    cfg = dataclasses.replace(
        PLANTED, objective="implicit", bits=32, prior_bits=8, weight_decay=0.0, max_epochs=6
    )
    training = fit(cfg, data, 101, 61)
    users, items = training.signs()
    assert users.shape == (101, 32) and items.shape == (61, 32)
    assert (users[:, -8:] == 1).all()
    vectors = training.vectors()
    assert vectors["relaxed"][1].shape == (61, 32) and vectors["float"][1].shape == (61, 16)
    table = embeddings_table(vectors)
    assert table.schema.field("relaxed").type.list_size == 32
    assert table.schema.field("float").type.list_size == 16
    # The 32-bit codes are what the binary model scores by.
    model = training.models.models[BINARY]
    pairs = np.array([1, 2, 3]), np.array([1, 30, 60])
    np.testing.assert_allclose(model.predict(*pairs), (users[pairs[0]] * items[pairs[1]]).sum(1))


def test_logit_scale_scales_the_training_logits_and_leaves_the_codes_order() -> None:
    training = EncoderTraining(EncoderConfig(dim=8, beta_step=1.0, logit_scale=0.25), 5, 6)
    model = training.models.models[BINARY]
    users, items = torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5])
    model.train()
    logits = model(users, items, beta=1.0)  # beta 1: every element is its sign
    codes_u, codes_i = model.signs()
    inner = (codes_u[users] * codes_i[items]).sum(-1)
    torch.testing.assert_close(logits, 0.25 * inner)
    np.testing.assert_allclose(model.predict(users.numpy(), items.numpy()), inner.numpy())


def test_each_model_is_exported_at_its_own_best_epoch_also_from_a_checkpoint(tmp_path) -> None:
    data = split_samples(planted_samples(seed=3))
    cfg = dataclasses.replace(
        PLANTED, float_lr=0.3, float_weight_decay=0.0, max_epochs=25, patience=25
    )
    training = EncoderTraining(cfg, 101, 61)
    while not training.finished:
        training.train_epoch(data["train"])
        training.validate(data["valid"])
    assert training.best[FLOAT]["epoch"] != training.best[BINARY]["epoch"]
    training.save(tmp_path)
    training.restore_kept()
    exported = EncoderTraining(cfg, 101, 61)
    exported.load(tmp_path, weights_only=True)
    exported.restore_kept()
    for run in (training, exported):
        for name in (BINARY, FLOAT):
            auc = evaluate(run.evaluated.models[name], data["valid"])["auc"]
            assert auc == pytest.approx(training.best[name]["valid"]["auc"], abs=1e-12)
    np.testing.assert_array_equal(exported.signs()[1], training.signs()[1])
    np.testing.assert_array_equal(exported.vectors()["float"][0], training.vectors()["float"][0])


def test_ema_averages_every_step_with_a_warm_up_and_is_what_is_validated() -> None:
    data = split_samples(planted_samples(seed=1))
    cfg = dataclasses.replace(PLANTED, ema_decay=0.9, batch_size=100_000)  # one step per epoch
    training = EncoderTraining(cfg, 101, 61)
    assert training.evaluated is training.averaged
    start = training.weights()
    training.train_epoch(data["train"])
    assert training.steps == 1 and ema_decay_at(1, 0.9) == pytest.approx(2 / 11)
    averaged = training.averaged.state_dict()
    for key, live in training.models.state_dict().items():
        expected = torch.lerp(start[key], live, 1 - 2 / 11)
        torch.testing.assert_close(averaged[key], expected)
    assert ema_decay_at(1000, 0.9) == 0.9
    training.validate(data["valid"])
    expected_auc = evaluate(training.averaged.models[BINARY], data["valid"])["auc"]
    assert training.valid_auc == expected_auc
    assert expected_auc != evaluate(training.models.models[BINARY], data["valid"])["auc"]


def test_ema_decay_is_below_one() -> None:
    with pytest.raises(ConfigError, match=r"ema_decay = 1.0 is not in \[0, 1\)"):
        EncoderTraining(EncoderConfig(ema_decay=1.0), 5, 6)


_TRAIN_IN_A_PROCESS = """
import hashlib, torch
from binllm_core.codes import embeddings_table
from binllm_core.config import EncoderConfig
from binllm_core.encoder.data import split_samples
from binllm_core.encoder.training import EncoderTraining
from tests.builders import planted_samples
torch.set_num_threads(2)
data = split_samples(planted_samples(seed=1))
cfg = EncoderConfig(dim=64, objective="implicit", prior_bits=16, logit_scale=0.125,
                    weight_decay=0.0, batch_size=256, max_epochs=15, seed=7)
training = EncoderTraining(cfg, 101, 61, seen=data["train"])
for _ in range(cfg.max_epochs):
    training.train_epoch(data["train"])
weights = b"".join(w.numpy().tobytes() for w in training.weights().values())
print(hashlib.sha256(weights).hexdigest())
"""


@pytest.mark.slow  # two processes
def test_one_seed_trains_the_same_weights_in_another_process_on_two_threads() -> None:
    """Without deterministic kernels, the scattered sums of the embeddings' backward on two
    threads gave three processes three sets of weights after 15 epochs."""
    root = Path(__file__).resolve().parents[3]
    digests = {
        subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_A_PROCESS],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1


def test_float_first_trains_the_float_model_then_codes_from_its_kept_tables(tmp_path) -> None:
    data = split_samples(planted_samples(seed=4))
    cfg = dataclasses.replace(
        PLANTED, objective="implicit", max_epochs=5, patience=5, float_first=True
    )
    training = EncoderTraining(cfg, 101, 61, seen=data["train"])
    untrained_codes = {k: v.clone() for k, v in training.models.models[BINARY].state_dict().items()}
    kept_float = []
    while training.codes_start is None:
        training.train_epoch(data["train"])
        kept_float.append(training.validate(data["valid"]))
        # The float model trains alone: the codes neither move nor are validated.
        assert "binary_valid_ndcg" not in training.history[-1]
        assert training.valid_score is None
    assert training.codes_start == 5 and training.best[FLOAT]["epoch"] < 5
    # An epoch that improves the float model alone is one to checkpoint (the stage resumes it).
    assert kept_float[training.best[FLOAT]["epoch"]]
    teacher = training.models.models[FLOAT]
    student = training.models.models[BINARY]
    kept = training.kept[FLOAT]
    for name, weight in teacher.state_dict().items():
        assert torch.equal(weight, kept[name])  # held at its best epoch from here on
    for side in ("user_emb", "item_emb"):
        assert torch.equal(
            student.backbone.state_dict()[f"{side}.weight"], kept[f"backbone.{side}.weight"]
        )
    for name in ("proj_u.weight", "proj_i.weight"):
        assert torch.equal(student.state_dict()[name], untrained_codes[name])

    training.train_epoch(data["train"])
    training.validate(data["valid"])
    assert training.history[-1]["beta"] == 0.0  # beta starts again with the codes
    training.save(tmp_path)
    resumed = EncoderTraining(cfg, 101, 61, seen=data["train"])
    resumed.load(tmp_path)
    for run in (training, resumed):
        while not run.finished:
            run.train_epoch(data["train"])
            run.validate(data["valid"])
    assert training.epoch == 9 and training.best[BINARY]["epoch"] >= 5
    for name, weight in training.weights().items():
        torch.testing.assert_close(resumed.weights()[name], weight, rtol=0, atol=0)
    for name, weight in training.models.models[FLOAT].state_dict().items():
        assert torch.equal(weight, kept[name])
    untrained = EncoderTraining(cfg, 101, 61, seen=data["train"])
    random_lists = untrained.list_ndcg(untrained.models.models[BINARY], data["valid"])
    assert training.best[BINARY]["valid"]["ndcg"] > random_lists + 0.03
