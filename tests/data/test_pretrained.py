"""The FP32 teachers shipped with the package: hash-checked loading, and the recorded held-out scores."""

import shutil

import pytest
import torch

from spark_ext.models import PRETRAINED_TEACHERS, build_model, load_pretrained_teacher
from spark_ext.models.pretrained import WEIGHTS_DIR


@pytest.mark.parametrize("task", ["denoise", "sr"])
def test_loads_frozen_in_eval_mode(task):
    spec = PRETRAINED_TEACHERS[task]
    model = load_pretrained_teacher(task)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = build_model(task, spec.width, depth=spec.depth, scale=spec.scale)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.rand(1, 3, 16, 16)
    out = model(x)
    assert out.shape == (1, 3, 16 * (spec.scale if task == "sr" else 1), 16 * (spec.scale if task == "sr" else 1))
    n_params = sum(p.numel() for p in ref.parameters())
    assert (WEIGHTS_DIR / spec.filename).stat().st_size < 4 * n_params + 16_384  # fp32 weights, nothing else


def test_a_changed_file_is_refused(tmp_path):
    spec = PRETRAINED_TEACHERS["denoise"]
    bad = tmp_path / spec.filename
    shutil.copy(WEIGHTS_DIR / spec.filename, bad)
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256"):
        load_pretrained_teacher("denoise", path=bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained_teacher("denoise", path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="task"):
        load_pretrained_teacher("deblur")


@pytest.mark.parametrize("task", ["denoise", "sr"])
def test_recorded_held_out_scores_are_reproduced(task):
    # docs/teachers.md and PRETRAINED_TEACHERS quote these numbers; re-measure them (whole photos).
    pytest.importorskip("skimage")
    from spark_ext.data import RestorationTask, held_out_pairs
    from spark_ext.demo.scoring import evaluate

    torch.set_num_threads(1)
    spec = PRETRAINED_TEACHERS[task]
    result = evaluate(load_pretrained_teacher(task), RestorationTask(task), held_out_pairs(RestorationTask(task)))
    assert result["psnr"] == pytest.approx(spec.psnr, abs=1e-3)
    assert result["ssim"] == pytest.approx(spec.ssim, abs=2e-5)
