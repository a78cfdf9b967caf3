"""DiffKD: the diffusion loss falls, denoising brings student latents closer to the teacher's,
the trainer logs its losses, works with the balancers, and resumes bitwise."""

import copy

import pytest
import torch

from spark_ext.distill import DiffKD, SparkDistiller
from spark_ext.distill.baselines.diffkd import ddpm_alpha_bar
from spark_ext.models import EncoderDecoderNet


def teacher_and_noisy_student(noise=0.8):
    """A small teacher and a student whose weights are the teacher's plus noise (noisier features)."""
    torch.manual_seed(0)
    teacher = EncoderDecoderNet(width=4, depth=1)
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    return student, teacher


def images(n=8, seed=2):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_schedule_and_validation():
    ab = ddpm_alpha_bar(100)
    assert ab.shape == (100,) and bool((ab[1:] < ab[:-1]).all()) and 0 < ab[-1] < ab[0] < 1
    s, t = teacher_and_noisy_student()
    with pytest.raises(ValueError, match="start_step"):
        DiffKD(s, [t], "bottleneck", num_steps=10, start_step=10)
    with pytest.raises(ValueError, match="sample_steps"):
        DiffKD(s, [t], "bottleneck", start_step=3, sample_steps=4)
    with pytest.raises(ValueError, match="diffkd_layer"):
        SparkDistiller(s, t, torch.optim.SGD(s.parameters(), lr=0.1), mode="qat", diffkd_layer="bottleneck")


def train_diffkd(steps=100):
    student, teacher = teacher_and_noisy_student()
    dk = DiffKD(student, [teacher], "bottleneck", start_step=100, sample_steps=4, lr=3e-3, seed=0)
    x = images()
    logs = []
    for _ in range(steps):
        with torch.no_grad():
            student(x)
            teacher(x)
        kd = dk.loss(dk.teacher_features())
        dk.zero_grad()
        (kd + dk.aux_loss).backward()
        dk.optimizer_step()
        logs.append(dk.stats())
    return dk, student, teacher, x, logs


def test_diffusion_loss_falls_and_denoising_helps():
    dk, student, teacher, x, logs = train_diffkd()
    first = torch.stack([lg["diffkd_diffusion"] for lg in logs[:10]]).mean()
    last = torch.stack([lg["diffkd_diffusion"] for lg in logs[-10:]]).mean()
    assert last < 0.7 * first, (first, last)
    assert logs[-1]["diffkd_ae"] < logs[0]["diffkd_ae"]
    # The trained denoiser, fed the student's latent (same encoder: same architecture) at the
    # sampler's start step, returns a latent closer to the teacher's than the raw student latent.
    with torch.no_grad():
        student(x)
        teacher(x)
        f_s, f_t = dk.student_tap.take(), dk.teacher_features()
        scale = f_t.pow(2).mean().sqrt()
        z_s, z_t = dk.modules.encoder(f_s / scale), dk.modules.encoder(f_t / scale)
        ab = dk.alpha_bar[dk.start_step]
        denoised = dk.ddim_denoise(ab.sqrt() * z_s)
    before = (z_s - z_t).pow(2).mean()
    after = (denoised - z_t).pow(2).mean()
    print("student-teacher latent MSE before/after denoising", float(before), float(after))
    assert after < 0.9 * before, (before, after)


def batches():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(4):
        y = torch.rand(2, 3, 8, 8, generator=g)
        out.append((y + 0.1 * torch.randn(y.shape, generator=g), y))
    return out


def fresh_run(teacher, balancer="gor", mode="spark"):
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.9)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    d = SparkDistiller(
        student, teacher, opt, mode=mode, balancer=balancer, grid=(2, 2), seed=3, diffkd_layer="bottleneck"
    )
    return student, d


@pytest.mark.parametrize("balancer,mode", [("none", "kd"), ("gor", "kd"), ("lmr", "spark")])
def test_trainer_logs_diffkd_losses_and_trains_its_modules(balancer, mode):
    _, teacher = teacher_and_noisy_student()
    _, d = fresh_run(teacher, balancer, mode)
    logs = [d.step(*b) for b in batches()[:2]]
    for key in ("diffkd_ae", "diffkd_diffusion", "diffkd_kd", "diffkd_gamma", "loss_kd"):
        assert key in logs[-1] and torch.isfinite(torch.tensor(logs[-1][key]))
    assert logs[0]["diffkd_kd"] == pytest.approx(logs[0]["loss_kd"])
    before = copy.deepcopy(d.diffkd.modules.state_dict())
    d.step(*batches()[2])
    after = d.diffkd.modules.state_dict()
    assert any(
        not torch.equal(before[k], after[k]) for k in ("encoder.weight", "project.weight", "noise_net.conv_out.weight")
    )
    d.close()


def test_resume_is_bitwise():
    _, teacher = teacher_and_noisy_student()
    data = batches()
    torch.manual_seed(1)
    _, run_a = fresh_run(teacher)
    logs_a = [run_a.step(*b) for b in data]

    torch.manual_seed(1)
    _, run_b = fresh_run(teacher)
    logs_b = [run_b.step(*b) for b in data[:2]]
    state = run_b.state_dict()
    torch.manual_seed(99)  # disturb the global RNG: the checkpoint restores it
    student_c, run_c = fresh_run(teacher)
    run_c.load_state_dict(state)
    logs_b += [run_c.step(*b) for b in data[2:]]
    assert logs_a == logs_b
    for k, v in run_a.student.state_dict().items():
        assert torch.equal(v, student_c.state_dict()[k]), k
    for k, v in run_a.diffkd.modules.state_dict().items():
        assert torch.equal(v, run_c.diffkd.modules.state_dict()[k]), k


def test_diffkd_cli_smoke_and_bad_arguments(tmp_path, capsys):
    from spark_ext.cli import main

    assert main(["diffkd", "--methods", "kd,nope"]) == 2
    assert "--methods" in capsys.readouterr().err
    out = tmp_path / "r.json"
    argv = [
        "diffkd",
        "--seeds",
        "1",
        "--teacher-steps",
        "2",
        "--steps",
        "2",
        "--crop",
        "16",
        "--eval-size",
        "32",
        "--width",
        "4",
        "--methods",
        "kd,diffkd",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    import json

    report = json.loads(out.read_text())
    assert set(report["psnr"]) == {"kd", "diffkd"} and "diffkd_diffusion" in report["last_step_log"]["diffkd"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval-size", "100000"], "--eval-size must be <= 300"),
        (["--crop", "4096"], "--crop must be <= 172"),
        (["--out", "{tmp}"], "is a folder"),
    ],
)
def test_sizes_and_out_are_checked_before_the_teacher(argv, message, tmp_path, monkeypatch, capsys):
    # These were ValueError / IsADirectoryError tracebacks, --crop's and --out's after training.
    pytest.importorskip("skimage")
    import spark_ext.demo.teacher
    from spark_ext.cli import main

    def trained(*args, **kwargs):
        pytest.fail("the teacher was loaded before the arguments were checked")

    monkeypatch.setattr(spark_ext.demo.teacher, "get_teacher", trained)
    assert main(["diffkd"] + [a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []
