"""No silent wrong results: every kind of file the tool reads, damaged, and every way of (re)using
an output folder, run through the command line. A problem of one image fails that image (exit 1,
named in the summary) and the batch goes on; a problem of the run stops it (exit 2); never a
traceback."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import config
import landmarks
import modelFiles
import morphableModel
import optimizer

STAGE1 = ['--iterations', '10', '0', '0', '--set', 'textureResolution=256', '--maxResolution', '96']


def run(args: list, capsys) -> tuple:
    status = optimizer.main([str(a) for a in args])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert 'Traceback' not in text, text
    return status, text


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
    """The astronaut, and its 68 landmarks in a file (so that most runs need no detector)."""
    import skimage.data
    folder = tmp_path_factory.mktemp('photo')
    Image.fromarray(skimage.data.astronaut()).save(folder / 'astronaut.png')
    points, _ = landmarks.MediapipeDetector().detect(skimage.data.astronaut())
    np.savetxt(folder / 'astronaut.txt', points)
    return dict(image=folder / 'astronaut.png', landmarks=folder / 'astronaut.txt', points=points)


def ict_args(folder: str) -> list:
    return ['--set', 'model=ict', '--set', f'path={folder}']


@pytest.fixture
def ict(ict_folder):
    return ict_args(ict_folder)


def ict_copy(ict_folder: str, folder, damage) -> str:
    """ICT-FaceKit as links to the real files, but for those that ``damage(model_folder)`` replaces."""
    source = os.path.join(ict_folder, 'FaceXModel')
    target = folder / 'FaceXModel'
    target.mkdir(parents=True)
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), target / name)
    damage(target)
    return str(folder)


def replace_file(path, content) -> None:
    os.remove(path)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


# ------------------------------------------------------------------------------- config keys

def bad_values(spec: dataclasses.Field) -> list:
    """Values every key must refuse, from its type and declared range."""
    meta = spec.metadata
    if spec.type is bool:
        return ['maybe', 2, 0.5]
    if 'choices' in meta:
        return ['nonsense', 3]
    if 'range' in meta:
        low, high = meta['range']
        values = [low - 1, high * 2 + 1, 'ten']
        return values + (['nan', 'inf', '-inf', low + 0.5] if spec.type is int else ['nan', 'inf', '-inf'])
    return ['' if spec.name == 'path' else None]


@pytest.mark.parametrize('spec', [f for f in dataclasses.fields(config.Config) if f.name != 'landmarksAssociation'],
                         ids=lambda f: f.name)
def test_every_config_key_refuses_values_out_of_its_range(spec):
    """Each key, each kind of impossible value: a ConfigError that names the key and what it accepts
    (landmarksAssociation is any path, checked when the model loads: see the table below)."""
    for value in bad_values(spec):
        assert value is not None, f'{spec.name} has no range to check'
        with pytest.raises(config.ConfigError, match=f"'{spec.name}'.*expected"):
            config.Config().replace(**{spec.name: value})


# ---------------------------------------------------------------------- damaged files, table

def binary_config(tmp_path):
    path = tmp_path / 'config.ini'
    path.write_bytes(bytes(range(256)) * 4)
    return ['--config', path]


def landmarks_file(tmp_path, points):
    path = tmp_path / 'lm.txt'
    np.savetxt(path, points)
    return ['--landmarks', path]


def photo_file(tmp_path, make):
    folder = tmp_path / 'in'
    folder.mkdir()
    make(folder)
    return ['--input', folder]


def truncated(folder):
    Image.new('RGB', (300, 300), (120, 90, 70)).save(folder / 'x.png')
    data = (folder / 'x.png').read_bytes()
    (folder / 'x.png').write_bytes(data[:len(data) // 3])


def long_thin(folder):
    Image.new('RGB', (9000, 40), (120, 90, 70)).save(folder / 'thin.png')


def not_an_image(folder):
    (folder / 'notes.jpg').write_text('hello')


def missing_expression(model):
    os.remove(model / 'jawOpen.obj')


def truncated_identity(model):
    lines = (model / 'identity000.obj').read_text().splitlines()
    replace_file(model / 'identity000.obj', '\n'.join(lines[:10000]))  # cut inside the vertices


def damaged_indices(model):
    replace_file(model / 'vertex_indices.json', '{"expressions": [')


def no_neutral(model):
    os.remove(model / 'generic_neutral_mesh.obj')


CASES = {
    # id: (arguments beyond the photo and --output from (tmp_path, photo, ICT folder), exit status, words in the message)
    'config is a binary file': (lambda t, p, f: binary_config(t), 2, 'is not a text file'),
    '--maxResolution 0': (lambda t, p, f: ['--maxResolution', '0'], 2, "'maxResolution' = 0 is not valid"),
    '--set without =': (lambda t, p, f: ['--set', 'bands'], 2, 'expected KEY=VALUE'),
    'a NaN weight': (lambda t, p, f: ['--set', 'weightShapeReg=nan'], 2, "'weightShapeReg' = nan"),
    'an empty model path': (lambda t, p, f: ['--set', 'path='], 2, "'path' = '' is not valid"),
    'no association file': (lambda t, p, f: ict_args(f) + ['--set', 'landmarksAssociation=/nonexistent.txt'], 2,
                            "landmark association file '/nonexistent.txt' not found"),
    'negative iterations': (lambda t, p, f: ict_args(f) + ['--iterations', '5', '-1', '0'], 2, "'iterStep2' = -1"),
    'truncated photo': (lambda t, p, f: ict_args(f) + photo_file(t, truncated), 1, 'truncated or corrupt'),
    'not an image': (lambda t, p, f: ict_args(f) + photo_file(t, not_an_image), 1, 'not an image file'),
    'thin photo, reduced': (lambda t, p, f: ict_args(f) + photo_file(t, long_thin), 1, 'the image is 9000x40 px, 5x smaller'),
    'landmarks all outside': (lambda t, p, f: ict_args(f) + landmarks_file(t, p['points'] + 5000), 1,
                              'only 0 of 68 landmarks lie inside'),
    'landmarks all equal': (lambda t, p, f: ict_args(f) + landmarks_file(t, np.full((68, 2), 200.0)), 1, 'span only 0.0 px'),
    'landmarks, 67 rows': (lambda t, p, f: ict_args(f) + landmarks_file(t, p['points'][:67]), 1, 'expected 68 rows'),
    'landmarks folder without the file': (lambda t, p, f: ict_args(f) + ['--landmarks', t], 1, 'cannot read landmarks'),
    'model: an expression missing': (lambda t, p, f: ict_args(ict_copy(f, t / 'm', missing_expression)),
                                     2, 'is incomplete or damaged'),
    'model: truncated identity': (lambda t, p, f: ict_args(ict_copy(f, t / 'm', truncated_identity)),
                                  2, 'identity000.obj'),
    'model: damaged index file': (lambda t, p, f: ict_args(ict_copy(f, t / 'm', damaged_indices)),
                                  2, 'is incomplete or damaged'),
    'model: no neutral mesh': (lambda t, p, f: ict_args(ict_copy(f, t / 'm', no_neutral)),
                               2, 'ICT-FaceKit not found'),
    'model: BFM files missing': (lambda t, p, f: ['--set', 'model=bfm2017', '--set', f'path={t}'], 2,
                                 'faces.dmi.unibas.ch'),
}


@pytest.mark.parametrize('case', list(CASES), ids=list(CASES))
def test_damaged_input_ends_with_a_message(case, photo, ict_folder, tmp_path, capsys):
    make, status, words = CASES[case]
    extra = [str(a) for a in make(tmp_path, photo, ict_folder)]
    base = ['--input', photo['image']] if '--input' not in extra else []
    if '--landmarks' not in extra and '--input' not in extra:
        base += ['--landmarks', photo['landmarks']]
    got, text = run(base + ['--output', tmp_path / 'out'] + STAGE1 + extra, capsys)
    print(f'{case}: exit {got}: {text.strip().splitlines()[-1 if got == 2 else 0][:200]}')
    assert got == status and words in text, text
    if status == 2:
        assert text.count('\n') <= 3, text  # one line that says what to do (and the config warning at most)


def test_a_folder_with_unreadable_entries_names_them_and_fits_the_rest(photo, ict, tmp_path, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    shutil.copy(photo['image'], folder / 'a.png')
    os.symlink(tmp_path / 'gone.jpg', folder / 'b.jpg')
    (folder / 'c.jpg').mkdir()
    status, text = run(['--input', folder, '--output', tmp_path / 'out'] + STAGE1 + ict, capsys)
    assert status == 0 and 'skipping' in text and 'b.jpg: a broken link' in text, text
    assert 'c.jpg: a folder, not an image file' in text and 'done: 1 of 1 images fitted' in text


# --------------------------------------------------------------------- caches and checkpoints

def test_the_model_cache_is_rebuilt_when_any_source_changes_or_it_is_inconsistent(ict_folder, tmp_path):
    folder = ict_copy(ict_folder, tmp_path / 'm', lambda model: None)
    model_folder = tmp_path / 'm' / 'FaceXModel'
    first = modelFiles.load_ict(folder)
    # a changed identity shape (not one of the two files the cache used to key on)
    lines = os.readlink(model_folder / 'identity007.obj')
    text = open(lines).read().splitlines()
    index = next(k for k, line in enumerate(text) if line.startswith('v '))
    x, y, z = map(float, text[index].split()[1:4])
    text[index] = f'v {x + 1.0} {y} {z}'  # 1 cm on vertex 0
    replace_file(model_folder / 'identity007.obj', '\n'.join(text) + '\n')
    second = modelFiles.load_ict(folder)
    assert not torch.equal(first.shape_basis[7], second.shape_basis[7])
    assert abs(float(second.shape_basis[7, 0, 0] - first.shape_basis[7, 0, 0]) - 10.0) < 1e-3  # mm
    # a cache file that reads but holds no consistent model (a basis of the wrong size), or garbage
    sources = sorted(str(p) for p in model_folder.glob('*.obj')) + [str(model_folder / 'vertex_indices.json')]
    cache = morphableModel.cache_path(sources, 'ict')
    assert os.path.isfile(cache)
    np.savez(cache, **{**{k: v for k, v in np.load(cache).items()}, 'shape_basis': np.zeros((3, 5, 3), np.float32)})
    assert morphableModel.consistent(modelFiles.load_ict(folder))
    with open(cache, 'wb') as file:
        file.write(b'not a cache')
    assert torch.equal(modelFiles.load_ict(folder).shape_basis, second.shape_basis)


@pytest.mark.parametrize('damage', ['garbage', 'foreign', 'wrong shape'])
def test_a_damaged_or_foreign_checkpoint_fails_its_image(damage, photo, ict, tmp_path, capsys):
    output = tmp_path / 'out'
    args = ['--input', photo['image'], '--landmarks', photo['landmarks'], '--output', output] + ict
    assert run(args + ['--iterations', '10', '0', '0', '--set', 'textureResolution=256', '--maxResolution', '96'],
               capsys)[0] == 0
    key = checkpoints.image_key(checkpoints.file_digest(photo['image']))
    path = output / 'checkpoints' / f'{key}_stage1.pt'
    if damage == 'garbage':
        path.write_bytes(path.read_bytes()[:200])
    elif damage == 'foreign':
        torch.save({'weights': torch.zeros(3)}, path)
    else:
        params = torch.load(path)
        params['expression'] = torch.zeros(1, 7)
        torch.save(params, path)
    status, text = run(args + ['--resume', '--iterations', '10', '2', '0', '--set', 'textureResolution=256',
                               '--maxResolution', '96'], capsys)
    assert status == 1 and f"checkpoint '{path}'" in text and 'delete it to fit the photo again' in text, text


def test_a_run_resumed_after_stage2_leaves_out_what_stage2_left_out(photo, ict, tmp_path, capsys):
    """What stage 3 leaves out is saved with the stage-2 checkpoint, and a run resumed there
    leaves out those pixels (here replaced by a block, as if the least-squares start had left
    it out), not ones recomputed from the stage-2 face alone; a damaged file fails the photo."""
    output = tmp_path / 'out'
    args = ['--input', photo['image'], '--landmarks', photo['landmarks'], '--output', output] + ict + STAGE1[4:]
    assert run(args + ['--iterations', '10', '2', '0'], capsys)[0] == 0
    key = checkpoints.image_key(checkpoints.file_digest(photo['image']))
    saved = output / 'checkpoints' / f'{key}_leftout.pt'
    record = json.loads((output / 'params0.json').read_text())
    height, width = record['height'], record['width']
    block = torch.zeros(height, width, dtype=torch.bool)
    block[height // 3:height // 2, width // 3:width // 2] = True
    torch.save({'left_out': [block]}, saved)
    status, text = run(args + ['--iterations', '10', '2', '2', '--resume'], capsys)
    assert status == 0 and f'{key}: resuming after stage 2' in text, text
    overlay = np.asarray(Image.open(output / 'leftOut_0.png').convert('RGB')).astype(int)
    magenta = (overlay[..., 0] >= 153) & (overlay[..., 1] <= 102) & (overlay[..., 2] >= 153)
    assert (magenta == block.numpy()).mean() > 0.99, (magenta.sum(), block.sum())
    saved.write_bytes(b'not a checkpoint')
    (output / 'checkpoints' / f'{key}_stage3.pt').unlink()  # stage 3 to do again, from the stage-2 checkpoint
    status, text = run(args + ['--iterations', '10', '2', '2', '--resume'], capsys)
    assert status == 1 and f"checkpoint '{saved}'" in text and 'delete it' in text, text


def test_resume_matches_photos_by_content_not_position(photo, ict, tmp_path, capsys):
    """Fit b.png; add a.png, which sorts before it; --resume fits a.png and b.png's results move
    to its new index, from its own checkpoint: no result holds another person."""
    folder = tmp_path / 'in'
    folder.mkdir()
    shutil.copy(photo['image'], folder / 'b.png')
    output = tmp_path / 'out'
    assert run(['--input', folder, '--output', output] + STAGE1 + ict, capsys)[0] == 0
    Image.open(photo['image']).transpose(Image.FLIP_LEFT_RIGHT).save(folder / 'a.png')
    status, text = run(['--input', folder, '--output', output, '--resume'] + STAGE1 + ict, capsys)
    assert status == 0 and 'already fitted' not in text, text
    b_key = checkpoints.image_key(checkpoints.file_digest(folder / 'b.png'))
    assert f'{b_key}: resuming after stage 1' in text and text.count('stage 1 landmark error') == 1
    assert json.loads((output / 'params0.json').read_text())['source'].endswith('a.png')
    assert json.loads((output / 'params1.json').read_text())['source'].endswith('b.png')
    status, text = run(['--input', folder, '--output', output, '--resume'] + STAGE1 + ict, capsys)
    assert status == 0 and text.count('already fitted, skipped') == 2


def test_face_k_says_it_does_not_apply_to_landmarks_from_a_file(photo, ict, tmp_path, capsys):
    status, text = run(['--input', photo['image'], '--landmarks', photo['landmarks'], '--output', tmp_path / 'out',
                        '--face', '2'] + STAGE1 + ict, capsys)
    assert status == 0 and 'landmarks from file (--face 2 does not apply to them)' in text


def test_resume_refuses_checkpoints_of_another_config(photo, ict, tmp_path, capsys):
    args = ['--input', photo['image'], '--landmarks', photo['landmarks'], '--output', tmp_path / 'out'] + STAGE1 + ict
    assert run(args, capsys)[0] == 0
    status, text = run(args + ['--resume', '--set', 'bands=3'], capsys)
    assert status == 2 and 'bands was 9, now 3' in text and '--overwrite' in text
    status, text = run(args + ['--resume', '--face', '2'], capsys)  # another person of the photo
    assert status == 2 and 'face was 0, now 2' in text
    (tmp_path / 'out' / 'checkpoints' / 'run.json').write_text('{"config": ')
    status, text = run(args + ['--resume'], capsys)
    assert status == 2 and 'run.json' in text and 'is damaged' in text


def two_photos(folder, photo) -> None:
    """a.png (the astronaut) and b.png (mirrored) in ``folder``."""
    folder.mkdir()
    shutil.copy(photo['image'], folder / 'a.png')
    Image.open(photo['image']).transpose(Image.FLIP_LEFT_RIGHT).save(folder / 'b.png')


def test_a_changed_shared_identity_set_is_said_and_fitted_again(photo, ict, tmp_path, capsys):
    folder = tmp_path / 'in'
    two_photos(folder, photo)
    output = tmp_path / 'out'
    assert run(['--input', folder, '--output', output, '--sharedIdentity'] + STAGE1 + ict, capsys)[0] == 0
    os.remove(folder / 'b.png')
    status, text = run(['--input', folder, '--output', output, '--sharedIdentity', '--resume'] + STAGE1 + ict, capsys)
    assert status == 0 and 'not the set of the shared-identity run' in text and 'stage 1 landmark error' in text


# ------------------------------------------------------------------------------ the output folder

def test_one_writer_per_output_folder(photo, ict, tmp_path, capsys):
    output = tmp_path / 'out'
    output.mkdir()
    lock = output / checkpoints.LOCK_FILE
    args = ['--input', photo['image'], '--landmarks', photo['landmarks'], '--output', output] + STAGE1 + ict
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        lock.write_text(json.dumps(dict(pid=sleeper.pid, host=os.uname().nodename, started='earlier', command='fit')))
        status, text = run(args, capsys)
        assert status == 2 and f'is in use by process {sleeper.pid}' in text and not (output / 'params0.json').exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    status, text = run(args, capsys)  # the same lock, now of a dead process
    assert status == 0 and f'removing the stale lock of process {sleeper.pid}' in text
    assert not lock.exists()  # released at the end


def test_results_are_never_read_as_photos(photo, ict, tmp_path, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    shutil.copy(photo['image'], folder / 'a.png')
    status, text = run(['--input', folder, '--output', folder] + STAGE1 + ict, capsys)
    assert status == 2 and 'is (inside) the --output folder' in text
    output = tmp_path / 'out'
    assert run(['--input', folder, '--output', output] + STAGE1 + ict, capsys)[0] == 0
    status, text = run(['--input', output, '--output', tmp_path / 'other'] + STAGE1 + ict, capsys)
    assert status == 2 and 'results folder of this tool' in text
    status, text = run(['--input', output / 'render_0.png', '--output', tmp_path / 'other'] + STAGE1 + ict, capsys)
    assert status == 2 and 'results folder of this tool' in text


def test_overwrite_leaves_only_this_runs_results(photo, ict, tmp_path, capsys):
    folder = tmp_path / 'in'
    two_photos(folder, photo)
    output = tmp_path / 'out'
    assert run(['--input', folder, '--output', output] + STAGE1 + ict, capsys)[0] == 0
    os.remove(folder / 'b.png')
    status, text = run(['--input', folder, '--output', output, '--overwrite'] + STAGE1 + ict, capsys)
    assert status == 0 and '--overwrite: moved the earlier results' in text
    aside = [p for p in tmp_path.iterdir() if p.name.startswith('out.previous-')]
    assert len(aside) == 1 and (aside[0] / 'params1.json').is_file()  # nothing lost
    assert (output / 'params0.json').is_file() and not (output / 'params1.json').exists()
    status, text = run(['--output', output, '--replay'] + STAGE1 + ict, capsys)
    assert status == 0 and text.count('wrote') == 1 and 'turntable_0.gif' in text


def test_a_failed_run_leaves_nothing_that_blocks_the_next(photo, ict, tmp_path, capsys):
    output = tmp_path / 'out'
    args = ['--input', photo['image'], '--landmarks', photo['landmarks'], '--output', output] + STAGE1
    status, _ = run(args + ['--set', 'model=ict', '--set', f'path={tmp_path / "nothing"}'], capsys)
    assert status == 2
    (output / 'checkpoints' / '.tmp-killed.pt').write_bytes(b'half a checkpoint')  # a write that was killed
    status, text = run(args + ict, capsys)
    assert status == 0 and 'removed 1 unfinished file' in text
    assert not any(name.startswith('.tmp-') for _, _, files in os.walk(output) for name in files)


def test_a_full_disk_while_saving_a_checkpoint_fails_the_image(photo, ict, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError('[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file')
    monkeypatch.setattr(torch, 'save', full)
    status, text = run(['--input', photo['image'], '--landmarks', photo['landmarks'], '--output', tmp_path / 'o']
                       + STAGE1 + ict, capsys)
    assert status == 1 and 'writing the results failed (the checkpoint could not be written' in text
    assert 'continue with --resume' in text
