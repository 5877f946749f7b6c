"""Reading photos of every kind, writing files safely, failing and resuming cleanly."""
import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image

import config
import fitting
import photos
import utils


def test_rgba_is_composited_over_black(tmp_path):
    rgba = np.zeros((70, 80, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    pixels, reduction, _ = photos.load_image(str(tmp_path / 'a.png'))
    assert pixels.shape == (70, 80, 3) and reduction == 1
    assert np.allclose(pixels[0, 0], [200 / 255 * 128 / 255, 0, 0], atol=1e-3)


def test_grayscale_and_16_bit(tmp_path):
    Image.fromarray(np.full((70, 80), 100, np.uint8), 'L').save(tmp_path / 'g.png')
    pixels, _, _ = photos.load_image(str(tmp_path / 'g.png'))
    assert pixels.shape == (70, 80, 3) and np.allclose(pixels, 100 / 255)
    Image.fromarray(np.full((70, 80), 40000, np.uint16)).save(tmp_path / 'd.png')
    assert Image.open(tmp_path / 'd.png').mode.startswith('I')
    pixels, _, _ = photos.load_image(str(tmp_path / 'd.png'))
    assert pixels.shape == (70, 80, 3) and np.allclose(pixels, 40000 / 65535, atol=1e-4)


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path):
    """Stored 80 wide x 40 high, red on the left; EXIF orientation 6 (rotate 90° clockwise to
    view) -> 40 wide x 80 high, red on top."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40, 0] = 255
    stored[:, 40:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / 'r.jpg', exif=exif.tobytes(), quality=95)
    pixels, _, _ = photos.load_image(str(tmp_path / 'r.jpg'))
    assert pixels.shape == (80, 40, 3)
    assert pixels[10, 20, 0] > 0.9 and pixels[70, 20, 2] > 0.9


def test_huge_image_is_reduced_before_it_becomes_floats(tmp_path):
    Image.new('RGB', (8000, 6000), (90, 60, 40)).save(tmp_path / 'huge.jpg', quality=70)
    pixels, reduction, _ = photos.load_image(str(tmp_path / 'huge.jpg'))
    assert reduction == 4 and pixels.shape == (1500, 2000, 3) and pixels.dtype == np.float32


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    """A disk that fills while writing: the earlier file stays whole, no temporary is left."""
    path = tmp_path / 'params0.json'
    path.write_text('earlier result')
    real_open = open

    def full_disk_open(file, mode='r', *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if 'w' in mode:
            def write(_):
                raise OSError(errno.ENOSPC, 'No space left on device')
            handle.write = write
        return handle
    monkeypatch.setattr('builtins.open', full_disk_open)
    with pytest.raises(OSError):
        utils.write_text(str(path), 'new result')
    monkeypatch.undo()
    assert path.read_text() == 'earlier result'
    assert os.listdir(tmp_path) == ['params0.json']


def test_the_face_crop_is_square_inside_the_image_and_cut_at_its_border():
    rng = np.random.default_rng(0)
    for _ in range(200):
        points = rng.uniform(100, 140, (68, 2)) * rng.uniform(0.5, 3) + rng.uniform(0, 300, 2)
        side = np.ceil(photos.CROP_MARGIN * np.ptp(points, axis=0).max())
        x0, y0, x1, y1 = photos.face_crop(points, 2000, 2000)
        assert x1 - x0 == y1 - y0 == side  # corners rounded one by one made 167x168
        centre = (points.min(0) + points.max(0)) / 2
        assert np.abs([(x0 + x1) / 2, (y0 + y1) / 2] - centre).max() <= 0.5
    x0, y0, x1, y1 = photos.face_crop(np.array([[5.0, 10.0], [65.0, 70.0]]), 80, 1000)  # side 108 around (35, 40)
    assert (x0, y0, x1, y1) == (0, 0, 80, 94)


def test_adam_steps_are_torchs_fused_adam():
    """``fitting.adam_step`` (torch's fused Adam through its function, at each group's rate) moves
    two groups of tensors bit for bit as ``torch.optim.Adam(fused=True)`` does, over steps whose
    rates change, a tensor without a gradient at one step left as it is."""
    generator = torch.Generator().manual_seed(4)
    start = [torch.randn(5, 7, generator=generator), torch.randn(3, generator=generator), torch.randn(4, generator=generator)]
    ours, theirs = ([t.clone().requires_grad_(True) for t in start] for _ in range(2))
    group_of = lambda tensors: [dict(params=tensors[:2], lr=0.05), dict(params=tensors[2:], lr=0.2)]
    reference, moments = torch.optim.Adam(group_of(theirs), fused=True), {}
    for step in range(6):
        rates = [0.05 / (1 + step), 0.2 * 0.9 ** step]
        for tensors in (ours, theirs):
            for tensor in tensors:
                tensor.grad = None
            loss = sum(((t - 0.3) ** 2 * (k + 1)).sum() for k, t in enumerate(tensors[:2 if step == 3 else 3]))
            loss.backward()
        fitting.adam_step(group_of(ours), rates, moments)
        for group, rate in zip(reference.param_groups, rates):
            group['lr'] = rate
        reference.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), step
    assert not torch.equal(ours[0], start[0])


def test_nan_loss_goes_back_to_good_values_with_smaller_steps():
    """NaN at steps 5 and 6: x returns to its last snapshot (after step 0) and goes on."""
    x = torch.tensor([3.0], requires_grad=True)
    seen = {}

    def loss_fn(iteration):
        seen[iteration] = float(x)
        return dict(loss=(x ** 2).sum() * (float('nan') if iteration in (5, 6) else 1.0))
    fitting.adam_loop('test', [dict(params=[x], lr=0.1)], loss_fn, 30, config.Config())
    assert len(seen) == 30
    assert seen[7] == seen[1] < seen[0]  # back to the snapshot taken after step 0
    assert torch.isfinite(x).all() and float(x) < seen[7]


def test_a_nan_gradient_of_a_finite_loss_at_the_last_step_returns_good_values():
    """The loss is finite but its gradient NaN (0 times the infinite slope of sqrt at 0) at step
    10, where a snapshot is taken, and at the last step: neither step is taken, the values go
    back to the last good snapshot, and none is NaN (obama3.jpg's stage 2 ended with NaN
    parameters this way, and stage 3 then failed the whole batch)."""
    x = torch.tensor([3.0], requires_grad=True)

    def loss_fn(iteration):
        loss = (x ** 2).sum()
        if iteration in (10, 19):
            loss = loss + (0 * torch.sqrt(x - x.detach())).sum()
        return dict(loss=loss)
    fitting.adam_loop('test', [dict(params=[x], lr=0.1)], loss_fn, 20, config.Config())
    assert torch.isfinite(x).all() and float(x) < 3.0  # the snapshot after step 0


def test_a_loss_that_stays_nan_fails_the_image_clearly():
    x = torch.tensor([3.0], requires_grad=True)
    with pytest.raises(fitting.FitError, match='diverged'):
        fitting.adam_loop('stage 2', [dict(params=[x], lr=0.1)],
                          lambda k: dict(loss=(x * float('nan')).sum()), 30, config.Config())
