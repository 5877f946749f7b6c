"""The command line on real photos and on bad input."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import optimizer
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
    status, out = run(['--input', astronaut, '--output', str(tmp_path)] + ict_args(ict_folder, 50, 3, 2), capsys)
    assert status == 0, out
    for name in ['render_0.png', 'diffuseMap_0.png', 'specularMap_0.png', 'roughnessMap_0.png', 'mesh0.obj',
                 'mesh0.mtl', 'envMap_0.png', 'params0.json', 'landmarks0.png']:
        assert os.path.getsize(tmp_path / name) > 0, name
    params = json.loads((tmp_path / 'params0.json').read_text())
    assert params['width'] == 128 and params['stage'] == 3 and len(params['sh']) == 81
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
