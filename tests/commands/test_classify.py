"""Classification path: logit KD with temperature, LogitDistiller (balancers, ensemble, QAT),
the DA-QAKD metric and ranking, and the `spark-ext classify` / `spark-ext daqakd` CLIs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from spark_ext.cli import main as cli_main
from spark_ext.distill import AUGMENTATIONS, LogitDistiller, accuracy, cmi_and_fit, logit_kd_loss, score_augmentations
from spark_ext.models import DigitsCNN

pytest.importorskip("sklearn", reason="the digits data needs scikit-learn (demo extra)")
from spark_ext.data.digits import load_digits_split  # noqa: E402
from spark_ext.demo.digits import batches, train_teacher  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def teacher(digits):
    return train_teacher(digits[0], digits[1], width=8, steps=120, seed=0)


def test_digits_split_is_fixed_and_in_range(digits):
    x_tr, y_tr, x_te, y_te = digits
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797 and float(x_tr.max()) <= 1.0
    assert torch.equal(load_digits_split()[3], y_te)


def test_logit_kd_loss_is_t2_scaled_kl_with_stop_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    T = 3.0
    p_t = torch.softmax(t / T, 1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    loss = logit_kd_loss(s, t, T)
    torch.testing.assert_close(loss.double(), manual, rtol=1e-5, atol=1e-6)
    (loss * 2.5).backward()
    assert s.grad is not None and t.grad is None
    assert float(logit_kd_loss(s.detach(), s.detach(), T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        logit_kd_loss(s, t, 0.0)
    with pytest.raises(ValueError, match="logits"):
        logit_kd_loss(s, t[:, :3], T)


def test_teacher_learns(digits, teacher):
    assert accuracy(teacher, digits[2], digits[3]) > 0.6


@pytest.mark.parametrize(
    "mode,balancer,ensemble", [("qat", "none", False), ("kd", "none", False), ("kd", "gor", False), ("kd", "lmr", True)]
)
def test_w4a4_student_trains_with_each_method(digits, teacher, mode, balancer, ensemble):
    from spark_ext.quant import quantize_model

    x, y = digits[0], digits[1]
    torch.manual_seed(0)
    student = DigitsCNN(8)
    quantize_model(student, w_bits=4, a_bits=4)
    teachers = [teacher, teacher] if ensemble else teacher
    d = LogitDistiller(
        student,
        teachers if mode == "kd" else None,
        torch.optim.Adam(student.parameters(), lr=3e-3),
        mode=mode,
        balancer=balancer,
    )
    logs = [d.step(x[i], y[i]) for i in batches(len(y), 64, 40, 0)]
    assert logs[-1]["loss_task"] < logs[0]["loss_task"]
    assert (logs[-1]["loss_kd"] > 0) == (mode == "kd")
    if balancer == "gor":
        assert "gor_s1" in logs[-1]


def test_distiller_rejects_bad_input(teacher):
    student = DigitsCNN(4)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="teacher"):
        LogitDistiller(student, None, opt, mode="kd")
    with pytest.raises(ValueError, match="temperature"):
        LogitDistiller(student, teacher, opt, temperature=-1.0)
    d = LogitDistiller(student, teacher, opt)
    with pytest.raises(TypeError, match="int64"):
        d.step(torch.rand(2, 1, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="batch size"):
        d.step(torch.rand(2, 1, 8, 8), torch.zeros(3, dtype=torch.int64))


def test_logit_distiller_skips_a_non_finite_batch_and_rolls_back_exactly(teacher):
    # A batch holding inf made the GoR balancer and the student NaN for good; rolling back twice to one
    # in-memory checkpoint diverged (the optimisers updated the checkpoint's tensors in place).
    def make():
        torch.manual_seed(0)
        student = DigitsCNN(4)
        return LogitDistiller(student, teacher, torch.optim.Adam(student.parameters(), lr=1e-2), balancer="gor")

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]
    poisoned = data[0][0].clone()
    poisoned[1, 0, 2, 2] = float("inf")
    a, b = make(), make()
    for i, (x, y) in enumerate(data):
        if i == 2:
            log = a.step(poisoned, data[0][1])
            assert log["skipped"] == 1.0 and log["step"] == 2
        assert a.step(x, y) == b.step(x, y)
    checkpoint = a.state_dict()
    for _ in range(2):
        a.load_state_dict(checkpoint)
        logs = [a.step(x, y) for x, y in data]
    assert logs == [b.step(x, y) for x, y in data]


def test_cmi_and_fit_on_known_predictions():
    labels = torch.tensor([0, 0, 1, 1])
    onehot = F.one_hot(labels, 3).double()
    cmi, fit = cmi_and_fit(onehot * (1 - 3e-12) + 1e-12, labels, 3)
    assert float(cmi) == pytest.approx(0.0, abs=1e-9) and float(fit) == pytest.approx(0.0, abs=1e-9)
    uniform = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    cmi, fit = cmi_and_fit(uniform, labels, 3)
    assert float(cmi) == pytest.approx(0.0, abs=1e-12) and float(fit) == pytest.approx(math.log(3))
    # Same class centroids, but predictions that vary within each class: CMI > 0, fit unchanged.
    varied = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.1, 0.4, 0.5]], dtype=torch.float64)
    cmi_v, fit_v = cmi_and_fit(varied, labels, 3)
    q0, q1 = varied[:2].mean(0), varied[2:].mean(0)
    expected = sum(float((p * (p / q).log()).sum()) for p, q in zip(varied, [q0, q0, q1, q1])) / 4
    assert float(cmi_v) == pytest.approx(expected) and float(fit_v) == pytest.approx(
        -(math.log(q0[0]) + math.log(q1[1])) / 2
    )


def test_ranking_puts_label_destroying_augmentations_last(digits, teacher):
    ranking = score_augmentations(
        teacher, digits[0][:400], digits[1][:400], ["noise", "invert", "shift", "hflip"], seed=3
    )
    assert [r.name for r in ranking][-1] == "invert"
    assert ranking == score_augmentations(
        teacher, digits[0][:400], digits[1][:400], ["noise", "invert", "shift", "hflip"], seed=3
    )
    for r in ranking:
        assert r.score == pytest.approx(r.fit - r.cmi)
    with pytest.raises(ValueError, match="augmentation"):
        score_augmentations(teacher, digits[0][:10], digits[1][:10], ["blur"])


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_keep_shape_and_range(name):
    x = torch.rand(5, 1, 8, 8)
    out = AUGMENTATIONS[name](x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6


@pytest.mark.parametrize(
    "argv,match",
    [
        (["daqakd", "--seeds", "0,x"], "--seeds"),
        (["daqakd", "--candidates", "shift"], "--candidates"),
        (["daqakd", "--candidates", "shift,blur"], "--candidates"),
        (["daqakd", "--bits", "1"], "--bits"),
        (["classify", "--methods", "kd,foo"], "--methods"),
        (["classify", "--steps", "0"], "--steps"),
        (["classify", "--out", "/nonexistent/dir/x.json"], "--out"),
    ],
)
def test_cli_rejects_bad_arguments_before_work(argv, match, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # an argument type's error: argparse exits
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_daqakd_cli_smoke(tmp_path):
    out = tmp_path / "r.json"
    argv = [
        "daqakd",
        "--seeds",
        "0,1",
        "--steps",
        "5",
        "--teacher-steps",
        "5",
        "--teacher-width",
        "4",
        "--width",
        "4",
        "--candidates",
        "noise,invert",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["arms"]["bottom"] in ("noise", "invert") and set(report["paired"]) == {
        "top-none",
        "top-bottom",
        "none-bottom",
    }
    assert len(report["accuracy"]["top"]["per_seed"]) == 2


def test_classify_cli_smoke(tmp_path):
    out = tmp_path / "r.json"
    argv = [
        "classify",
        "--seeds",
        "0,1",
        "--steps",
        "5",
        "--teacher-steps",
        "5",
        "--teacher-width",
        "4",
        "--width",
        "4",
        "--methods",
        "qat,kd,ensemble",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == {"qat", "kd", "ensemble"} and set(report["paired_vs_qat"]) == {"kd", "ensemble"}


@pytest.mark.parametrize("command", ["classify", "daqakd"])
def test_out_naming_a_folder_is_refused_before_training(command, tmp_path, monkeypatch, capsys):
    # --out naming an existing folder passed the check, then every model trained and the write failed.
    import spark_ext.commands.classify
    import spark_ext.commands.daqakd

    def trained(*args, **kwargs):
        pytest.fail("trained before --out was checked")

    for module in (spark_ext.commands.classify, spark_ext.commands.daqakd):
        monkeypatch.setattr(module, "train_teacher", trained)
    assert cli_main([command, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is a folder" in err[0]
    assert list(tmp_path.iterdir()) == []
