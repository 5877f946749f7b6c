"""The command line on real photos and on bad input."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

import checkpoints
import optimizer
import results
from conftest import SHARED


def run(args, capsys):
    status = optimizer.main(args)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def ict_args(ict_folder, *iterations):
    return ['--set', 'model=ict', '--set', f'path={ict_folder}', '--iterations', *map(str, iterations),
            '--set', 'rtSamples=16', '--set', 'textureResolution=256', '--maxResolution', '128']


@pytest.fixture(scope='module')
def astronaut(tmp_path_factory):
    import skimage.data
    path = tmp_path_factory.mktemp('photos') / 'astronaut.png'
    Image.fromarray(skimage.data.astronaut()).save(path)
    return str(path)


def test_end_to_end_on_a_real_photo_writes_every_output(ict_folder, astronaut, tmp_path, capsys):
    debug = ['--set', 'debugFrequency=2', '--set', 'saveIntermediateStage=True']
    status, out = run(['--input', astronaut, '--output', str(tmp_path)] + ict_args(ict_folder, 50, 3, 2) + debug, capsys)
    assert status == 0, out
    for name in ['render_0.png', 'diffuseMap_0.png', 'specularMap_0.png', 'roughnessMap_0.png', 'mesh0.obj',
                 'mesh0.mtl', 'envMap_0.png', 'params0.json', 'landmarks0.png',
                 'mesh0_stage1.obj', 'params0_stage1.json', 'render_0_stage2.png', 'mesh0_stage2.obj',
                 'debug/stage2_image0_0000.png', 'debug/stage2_image0_0002.png', 'debug/stage3_image0_0001.png']:
        assert os.path.getsize(tmp_path / name) > 0, name
    key = checkpoints.image_key(checkpoints.file_digest(astronaut))  # checkpoints are named by the photo's content
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == [f'{key}_leftout.pt', f'{key}_stage1.pt', f'{key}_stage2.pt',
                                                            f'{key}_stage3.pt', 'run.json']
    params = json.loads((tmp_path / 'params0.json').read_text())
    assert params['width'] == params['height'] == 128 and params['stage'] == 3 and len(params['sh']) == 81  # the face's square
    render = np.asarray(Image.open(tmp_path / 'render_0.png'))
    assert render.shape[1] == 6 * params['width']
    mtl = (tmp_path / 'mesh0.mtl').read_text()
    assert 'map_Kd diffuseMap_0.png' in mtl and 'mtllib mesh0.mtl' in (tmp_path / 'mesh0.obj').read_text()
    # the landmark fit of stage 1 is good
    error = float(out.split('stage 1 landmark error ')[1].split(' px')[0])
    assert error < 3.0
    # the mesh projects where the landmarks are: vertex (x, y, z) -> (f x / z + w/2, f y / z + h/2)
    vertices = np.array([l.split()[1:] for l in (tmp_path / 'mesh0.obj').read_text().splitlines()
                         if l.startswith('v ')], float)
    u = params['focal'] * vertices[:, 0] / vertices[:, 2] + params['width'] / 2
    assert 0 < np.median(u) < params['width']
    # a second run into the same folder is refused, --resume finds everything done
    status, out = run(['--input', astronaut, '--output', str(tmp_path)] + ict_args(ict_folder, 50, 3, 2), capsys)
    assert status == 2 and '--overwrite' in out
    status, out = run(['--input', astronaut, '--output', str(tmp_path), '--resume'] + ict_args(ict_folder, 50, 3, 2), capsys)
    assert status == 0 and 'already fitted' in out
    # --replay renders a turntable from the checkpoints
    status, out = run(['--output', str(tmp_path), '--replay'] + ict_args(ict_folder, 50, 3, 2), capsys)
    assert status == 0 and 'turntable_0.gif (stage 3)' in out, out
    gif = Image.open(tmp_path / 'turntable_0.gif')
    assert gif.n_frames == results.TURNTABLE_FRAMES and gif.size == (params['width'], params['height'])


def test_a_batch_goes_on_past_bad_images(ict_folder, tmp_path, capsys):
    import skimage.data
    folder = tmp_path / 'in'
    folder.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(folder / 'a_cat.png')  # no human face
    (folder / 'b_notes.jpg').write_text('not an image')
    (folder / 'c_readme.txt').write_text('skipped')
    data = (folder / 'a_cat.png').read_bytes()
    (folder / 'd_truncated.png').write_bytes(data[:len(data) // 4])
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / 'e_tiny.png')
    status, out = run(['--input', str(folder), '--output', str(tmp_path / 'out')] + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 1
    assert 'a_cat.png: no face found' in out
    assert 'b_notes.jpg: not an image file' in out
    assert 'skipping' in out and 'c_readme.txt' in out
    assert 'd_truncated.png' in out and 'truncated or corrupt' in out
    assert 'e_tiny.png' in out and 'too small' in out
    assert '0 of 4 images fitted' in out


def test_two_people_fits_one_face(ict_folder, tmp_path, capsys):
    photo = os.path.join(SHARED, 'photos', 'two_people.jpg')
    if not os.path.isfile(photo):
        pytest.skip('../shared/photos is not here')
    status, out = run(['--input', photo, '--output', str(tmp_path)] + ict_args(ict_folder, 30, 0, 0), capsys)
    assert status == 0, out
    assert '2 faces found, fitting the largest' in out
    assert os.path.isfile(tmp_path / 'mesh0.obj') and os.path.isfile(tmp_path / 'params0.json')


def test_face_k_fits_the_kth_face_from_the_left(ict_folder, tmp_path, capsys):
    """--face 1 and --face 2 fit the two people of two_people.jpg, the left one and the right one;
    --face 3 is refused with what was found."""
    photo = os.path.join(SHARED, 'photos', 'two_people.jpg')
    if not os.path.isfile(photo):
        pytest.skip('../shared/photos is not here')
    crop_x = {}
    for k in (1, 2):
        status, out = run(['--input', photo, '--output', str(tmp_path / str(k)), '--face', str(k)]
                          + ict_args(ict_folder, 30, 0, 0), capsys)
        assert status == 0, out
        assert f'2 faces found, fitting the {("1st", "2nd")[k - 1]} from the left' in out
        crop_x[k] = json.loads((tmp_path / str(k) / 'params0.json').read_text())['crop'][0]  # photo pixels
    width = Image.open(photo).width
    assert crop_x[1] < width / 2 < crop_x[2], crop_x  # the fitted squares: one on each side of the photo
    status, out = run(['--input', photo, '--output', str(tmp_path / '3'), '--face', '3']
                      + ict_args(ict_folder, 30, 0, 0), capsys)
    assert status == 1 and '2 faces found, none 3rd from the left (--face 3)' in out, out


def test_landmarks_from_a_file(ict_folder, astronaut, tmp_path, capsys):
    points = tmp_path / 'lm.txt'
    np.savetxt(points, np.full((67, 2), 100.0))
    status, out = run(['--input', astronaut, '--output', str(tmp_path / 'o'), '--landmarks', str(points)]
                      + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 1 and 'expected 68 rows' in out


@pytest.mark.parametrize('args, message', [
    (['--input', '/nonexistent.jpg'], 'does not exist'),
    (['--set', 'bands=0'], "'bands' = 0 is not valid"),
    (['--set', 'model=bfm2017', '--set', 'path=/nonexistent'], 'faces.dmi.unibas.ch'),
])
def test_clear_errors(args, message, astronaut, tmp_path, capsys):
    base = ['--input', astronaut, '--output', str(tmp_path / 'o')]
    status, out = run(base + args, capsys)
    assert status == 2 and message in out and 'Traceback' not in out


def test_empty_folder(tmp_path, capsys):
    (tmp_path / 'in').mkdir()
    status, out = run(['--input', str(tmp_path / 'in'), '--output', str(tmp_path / 'o')], capsys)
    assert status == 2 and 'holds no images' in out


def test_cuda_without_a_gpu_warns_and_runs_on_the_cpu(ict_folder, astronaut, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has a CUDA GPU')
    status, out = run(['--input', astronaut, '--output', str(tmp_path), '--device', 'cuda']
                      + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 0 and "device = 'cuda' but no CUDA GPU" in out


def test_an_output_folder_that_cannot_be_written(astronaut, tmp_path, capsys):
    (tmp_path / 'a_file').write_text('')
    status, out = run(['--input', astronaut, '--output', str(tmp_path / 'a_file' / 'out')], capsys)
    assert status == 2 and 'cannot write to output folder' in out and 'Traceback' not in out


@pytest.fixture
def two_photos(astronaut, tmp_path):
    """The astronaut, and a smaller, narrower crop of it mirrored: two sizes in one folder."""
    folder = tmp_path / 'in'
    folder.mkdir()
    image = Image.open(astronaut)
    image.save(folder / 'a.png')
    image.crop((150, 20, 330, 300)).transpose(Image.FLIP_LEFT_RIGHT).save(folder / 'b.jpg')
    return folder


def test_images_of_different_sizes_with_a_shared_identity(ict_folder, two_photos, tmp_path, capsys):
    status, out = run(['--input', str(two_photos), '--output', str(tmp_path / 'o'), '--sharedIdentity']
                      + ict_args(ict_folder, 20, 3, 0), capsys)
    assert status == 0, out
    sizes = []
    for i in (0, 1):
        params = json.loads((tmp_path / 'o' / f'params{i}.json').read_text())
        render = Image.open(tmp_path / 'o' / f'render_{i}.png')
        assert render.size == (6 * params['width'], params['height'])
        sizes.append((params['width'], params['height']))
    assert sizes[0] != sizes[1]
    assert len(glob.glob(str(tmp_path / 'o' / 'checkpoints' / 'batch-*_stage2.pt'))) == 1


def test_ctrl_c_then_resume_redoes_no_finished_image(ict_folder, two_photos, tmp_path, capsys, monkeypatch):
    output = str(tmp_path / 'o')
    real_fit_group = optimizer.fit_group

    def interrupted_on_the_second(model, images, *args, **kwargs):
        if images[0].index == 1:
            raise KeyboardInterrupt
        return real_fit_group(model, images, *args, **kwargs)
    monkeypatch.setattr(optimizer, 'fit_group', interrupted_on_the_second)
    status, out = run(['--input', str(two_photos), '--output', output] + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 130 and f'continue with --resume --output {output}' in out
    assert os.path.isfile(os.path.join(output, 'params0.json')) and not os.path.exists(os.path.join(output, 'params1.json'))
    monkeypatch.setattr(optimizer, 'fit_group', real_fit_group)
    status, out = run(['--input', str(two_photos), '--output', output, '--resume']
                      + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 0, out
    assert 'a.png: already fitted, skipped (--resume)' in out and os.path.isfile(os.path.join(output, 'params1.json'))


def test_a_bug_in_one_photos_fit_fails_that_photo_and_the_next_is_fitted(ict_folder, two_photos, tmp_path, capsys,
                                                                         monkeypatch):
    output = str(tmp_path / 'o')
    real_fit_group = optimizer.fit_group

    def a_bug_on_the_first(model, images, *args, **kwargs):
        if images[0].index == 0:
            raise IndexError('index 0 is out of bounds for dimension 0 with size 0')
        return real_fit_group(model, images, *args, **kwargs)
    monkeypatch.setattr(optimizer, 'fit_group', a_bug_on_the_first)
    status, out = run(['--input', str(two_photos), '--output', output] + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 1 and 'a.png: unexpected IndexError (index 0 is out of bounds' in out and 'Traceback' in out
    assert '1 of 2 images fitted' in out and os.path.isfile(os.path.join(output, 'params1.json'))
    report = {entry['index']: entry for entry in json.loads((tmp_path / 'o' / 'manifest.json').read_text())['images']}
    assert report[0]['status'] == 'failed' and 'IndexError' in report[0]['error'] and report[1]['status'] == 'fitted'


@pytest.mark.parametrize('name, note', [('32bit.png', 'one face found'),
                                        ('obama_partial_face.jpg', 'landmarks outside the image are ignored')])
def test_rgba_and_partial_face_photos(ict_folder, tmp_path, capsys, name, note):
    photo = os.path.join(SHARED, 'photos', name)
    if not os.path.isfile(photo):
        pytest.skip('../shared/photos is not here')
    status, out = run(['--input', photo, '--output', str(tmp_path)] + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 0 and note in out, out


def test_a_full_disk_fails_the_image_with_a_clear_message(ict_folder, astronaut, tmp_path, capsys, monkeypatch):
    import errno

    def full_disk(path, image):
        raise OSError(errno.ENOSPC, 'No space left on device', path)
    monkeypatch.setattr(results, 'save_image', full_disk)
    status, out = run(['--input', astronaut, '--output', str(tmp_path)] + ict_args(ict_folder, 20, 0, 0), capsys)
    assert status == 1 and 'writing the results failed (No space left on device' in out and 'Traceback' not in out
    assert 'continue with --resume' in out


def test_a_ray_tracer_without_llvm_stops_with_the_fix(ict_folder, astronaut, tmp_path, capsys, monkeypatch):
    import renderer
    monkeypatch.setattr(renderer, '_mi', None)
    monkeypatch.setattr(renderer, '_find_libllvm', lambda: '')
    status, out = run(['--input', astronaut, '--output', str(tmp_path)] + ict_args(ict_folder, 20, 3, 0), capsys)
    assert status == 2 and 'needs LLVM >= 17: run ./setup.sh' in out and 'Traceback' not in out


def test_the_command_prints_only_its_own_lines(ict_folder, astronaut, tmp_path):
    """MediaPipe's and TensorFlow Lite's native log lines stay off the terminal (a process of its
    own: they write to the file descriptor, past Python)."""
    import subprocess
    import sys
    command = [sys.executable, os.path.join(os.path.dirname(optimizer.__file__), 'optimizer.py'),
               '--input', astronaut, '--output', str(tmp_path / 'o')] + ict_args(ict_folder, 5, 0, 0)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert 'one face found' in output and 'done: 1 of 1 images fitted' in output
    for noise in ('W0000', 'TensorFlow Lite', 'absl::InitializeLog', 'inference_feedback_manager'):
        assert noise not in output, output
