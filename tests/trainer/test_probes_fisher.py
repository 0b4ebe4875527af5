"""The Fisher eigenvalue probe against the Fisher matrix built exactly (J materialised, F = J^T H J / N,
eigvalsh), and its metrics in a real `normlab train` run tracked in MLflow."""

from __future__ import annotations

import copy

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.func import functional_call

from trainer import load_config, train
from trainer.cli import main
from trainer.models import build_model
from trainer.probes import FisherProbe, FisherProducts, fisher_lambda_max, predicted_lr_max


def tiny(norm: str) -> torch.nn.Module:
    """An MLP small enough to materialise its Fisher matrix: 4 inputs, 2 hidden layers of 6, 3 classes."""
    torch.manual_seed(0)
    return build_model({"arch": "mlp", "depth": 2, "width": 6, "norm": norm}, 3, 1, 2).train()


def exact_fisher(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """F = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i with J from torch's own Jacobian, as a P x P matrix."""
    model = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits_of(theta: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, params, (x,))

    z = logits_of(flat).detach()
    n, classes = z.shape
    jac = torch.autograd.functional.jacobian(logits_of, flat).reshape(n, classes, -1)  # (N, C, P)
    fisher = torch.zeros(flat.numel(), flat.numel())
    for i in range(n):
        p = torch.softmax(z[i], dim=0)
        h = torch.diag(p) - torch.outer(p, p)
        fisher += jac[i].T @ h @ jac[i]
    return fisher / n


@pytest.mark.parametrize("norm", ["bn", "none", "ic"])
def test_fisher_vector_products_and_lambda_max_equal_the_exact_matrix(norm):
    model = tiny(norm)
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    if norm == "ic":  # dropout: the same masks in both computations
        model = copy.deepcopy(model)
        for m in model.modules():
            if hasattr(m, "drop"):
                m.drop = 0.0
    fisher = exact_fisher(model, x)
    products = FisherProducts(copy.deepcopy(model), x)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for p in products.params]
    got = torch.cat([g.reshape(-1) for g in products(v)])
    torch.testing.assert_close(got, fisher @ torch.cat([t.reshape(-1) for t in v]), rtol=1e-4, atol=1e-6)

    eigenvalues = torch.linalg.eigvalsh(fisher.double())
    top = float(eigenvalues[-1])
    assert top > 0 and float(eigenvalues[-2]) < 0.95 * top  # a gap: the power iteration converges
    assert fisher_lambda_max(copy.deepcopy(model), x, iterations=300) == pytest.approx(top, rel=1e-3)
    assert predicted_lr_max(top) == pytest.approx(2 / top)
    assert predicted_lr_max(top, momentum=0.9) == pytest.approx(3.8 / top)


def test_the_probe_measures_a_copy_and_leaves_the_run_untouched():
    model = tiny("bn")
    x = torch.randn(8, 1, 2, 2)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    lam = FisherProbe(1, iterations=300).measure(model.eval(), x)
    assert torch.equal(torch.rand(3), expected_next)  # the training run's random stream is unchanged
    assert not model.training  # the run's own module keeps its mode
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # running statistics included
    # measured in training mode (batch statistics), as the run trains
    top = float(torch.linalg.eigvalsh(exact_fisher(model.train(), x).double())[-1])
    assert lam == pytest.approx(top, rel=1e-3)


def test_normlab_train_logs_lambda_max_and_the_predicted_lr_from_step_0(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["model.arch=plain_cnn", "model.depth=3", "model.width=8", "data.batch_size=32", "trainer.max_steps=4",
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.limit_val_batches=1",
            "probes.every_n_steps=2", "probes.fisher_every_n_steps=2", "probes.fisher_iterations=8",
            "probes.fisher_batch=16", f"tracking.uri={uri}", "tracking.experiment=fisher"]
    assert main(argv) == 0, capsys.readouterr().err
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fisher").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "fisher/lambda_max")}
    assert sorted(history) == [0, 2] and all(v > 0 for v in history.values())
    lr_max = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "fisher/lr_max")}
    lr_momentum = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "fisher/lr_max_momentum")}
    for step, lam in history.items():
        assert lr_max[step] == pytest.approx(2 / lam) and lr_momentum[step] == pytest.approx(2 * 1.9 / lam)
    concentration = client.get_metric_history(run.info.run_id, "probe/grad_concentration")
    assert [m.step for m in concentration] == [0, 2] and all(0.1 - 1e-6 <= m.value <= 1 for m in concentration)
    assert run.data.params["probes.fisher_every_n_steps"] == "2"


def test_a_resumed_run_probes_the_same_batch_and_trains_as_if_uninterrupted(tmp_path, crash_at):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["model.depth=8", "model.norm=ic", "data.batch_size=64", "data.val_batch_size=256",
                 "trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.deterministic=true",
                 "probes.every_n_steps=0", "probes.fisher_every_n_steps=10", "probes.fisher_iterations=4",
                 "probes.fisher_batch=16", f"tracking.uri={uri}"]
    whole = train(load_config(None, [*overrides, f"output.root={tmp_path / 'whole'}"]))
    cfg = load_config(None, [*overrides, f"output.root={tmp_path / 'parts'}"])
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(cfg, callbacks=[crash_at(step=30)])  # mid-epoch 2: last.ckpt is from the end of epoch 1 (step 22)
    resumed = train(cfg)
    assert resumed.run_id != whole.run_id
    for key in ("val_loss", "val_acc", "train_loss"):  # the probe leaves training as it was
        assert resumed.metrics[key] == whole.metrics[key], key
    client = MlflowClient(uri)

    def lambdas(run_id):
        return {m.step: m.value for m in client.get_metric_history(run_id, "fisher/lambda_max")}

    expected, got = lambdas(whole.run_id), lambdas(resumed.run_id)
    assert sorted(expected) == [0, 10, 20, 30, 40]
    for step in (30, 40):  # after the resume: the same probe batch (from the checkpoint), the same weights
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
