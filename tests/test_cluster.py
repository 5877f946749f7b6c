"""Batches split over many machines: Slurm array shards (--shard K/N) into one folder, their
reports merged, --resume; and the report manifest.json of every run."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import optimizer

STAGE1 = ['--iterations', '30', '0', '0', '--maxResolution', '128', '--set', 'textureResolution=256']


@pytest.fixture(scope='module')
def batch(tmp_path_factory):
    """Three photos: the astronaut, the astronaut mirrored, and a grey picture with no face."""
    import skimage.data
    folder = tmp_path_factory.mktemp('batch')
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(folder / 'a.png')
    Image.fromarray(astronaut[:, ::-1].copy()).save(folder / 'b.png')
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(folder / 'c.png')
    return folder


def run(args, capsys):
    status = optimizer.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def ict(folder):
    return ['--set', 'model=ict', '--set', f'path={folder}']


def report(folder, name='manifest.json'):
    return json.loads((folder / name).read_text())


def test_shards_into_one_folder_give_the_plain_run(batch, ict_folder, tmp_path, capsys):
    plain, sharded = tmp_path / 'plain', tmp_path / 'sharded'
    status, out = run(['--input', batch, '--output', plain] + STAGE1 + ict(ict_folder), capsys)
    assert status == 1, out  # the grey picture has no face
    entries = report(plain)['images']
    assert [(e['index'], e['status']) for e in entries] == [(0, 'fitted'), (1, 'fitted'), (2, 'failed')]
    assert 'no face found' in entries[2]['error'] and entries[0]['seconds'] > 0 and 'pid' in entries[0]['where']

    statuses = []
    for shard in range(2):
        status, out = run(['--input', batch, '--output', sharded, '--shard', f'{shard}/2'] + STAGE1 + ict(ict_folder),
                          capsys)
        statuses.append(status)
        assert f'shard {shard} of 2' in out
    assert statuses == [1, 0]  # shard 0 has photos 0 and 2 (no face), shard 1 photo 1
    assert [e['index'] for e in report(sharded, 'manifest.shard-0-of-2.json')['images']] == [0, 2]
    assert [e['index'] for e in report(sharded, 'manifest.shard-1-of-2.json')['images']] == [1]
    status, out = run(['--output', sharded, '--merge-manifests'], capsys)
    assert status == 1 and '2 photos fitted, 1 failed' in out and 'c.png' in out
    merged = report(sharded)
    assert (merged['fitted'], merged['failed']) == (2, 1)
    assert [(e['index'], e['status']) for e in merged['images']] == [(e['index'], e['status']) for e in entries]
    # the results are those of the plain run, under the same names
    for name in ('mesh0.obj', 'mesh1.obj', 'params0.json', 'params1.json'):
        assert (sharded / name).read_text() == (plain / name).read_text(), name

    # --resume skips what a shard finished; --overwrite cannot touch the other shards' results
    status, out = run(['--input', batch, '--output', sharded, '--shard', '1/2', '--resume'] + STAGE1 + ict(ict_folder),
                      capsys)
    assert status == 0 and 'already fitted, skipped (--resume)' in out
    status, out = run(['--input', batch, '--output', sharded, '--shard', '1/2', '--overwrite'] + STAGE1
                      + ict(ict_folder), capsys)
    assert status == 2 and '--overwrite with --shard' in out
    # a shard run again without --resume is refused (its results are there), the others' are no obstacle
    status, out = run(['--input', batch, '--output', sharded, '--shard', '1/2'] + STAGE1 + ict(ict_folder), capsys)
    assert status == 2 and 'already holds results' in out


@pytest.mark.parametrize('spec, message', [('2/2', 'K counts from 0 to N-1'), ('1-2', 'is not K/N')])
def test_bad_shard_specs(spec, message, batch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        optimizer.parse_arguments(['--input', str(batch), '--output', str(tmp_path), '--shard', spec])
    assert message in capsys.readouterr().err


def test_merging_names_the_shards_without_a_report(batch, ict_folder, tmp_path, capsys):
    output = tmp_path / 'out'
    status, _ = run(['--input', batch, '--output', output, '--shard', '1/3'] + STAGE1 + ict(ict_folder), capsys)
    assert status == 0
    status, out = run(['--output', output, '--merge-manifests'], capsys)
    assert status == 1 and 'no report yet from shard(s) 0, 2' in out
    status, out = run(['--output', tmp_path / 'nothing', '--merge-manifests'], capsys)
    assert status == 2 and 'no shard reports' in out


def ray_workers_fitting() -> list:
    """The PIDs of this machine's processes that run a FitWorker's fit (Ray names them so)."""
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/cmdline', 'rb') as file:
                    if file.read().startswith(b'ray::FitWorker.fit'):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_a_local_ray_cluster_gives_the_plain_run_and_retries_a_killed_worker(batch, ict_folder, tmp_path, capsys):
    import signal
    import threading
    pytest.importorskip('ray')
    plain, on_ray = tmp_path / 'plain', tmp_path / 'ray'
    run(['--input', batch, '--output', plain] + STAGE1 + ict(ict_folder), capsys)
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(status=optimizer.main(
        [str(a) for a in ['--input', batch, '--output', on_ray, '--ray', 'local', '--set', 'clusterCpus=1']
         + STAGE1 + ict(ict_folder)])))
    driver.start()
    killed = None
    while driver.is_alive() and killed is None:  # kill the first worker seen fitting a photo
        fitting = ray_workers_fitting()
        if fitting:
            killed = fitting[0]
            os.kill(killed, signal.SIGKILL)
        driver.join(0.02)
    driver.join(600)
    out = capsys.readouterr().out
    assert killed is not None, 'no worker was seen fitting'
    assert outcome['status'] == 1, out  # the grey picture has no face: reported, not retried
    entries = report(on_ray)['images']
    assert [(e['index'], e['status']) for e in entries] == [(0, 'fitted'), (1, 'fitted'), (2, 'failed')]
    assert 'no face found' in entries[2]['error'] and f'pid {killed}' not in entries[0]['where'] + entries[1]['where']
    # what came back to the driver is what the plain run wrote, under the same names
    for name in ('mesh0.obj', 'mesh1.obj', 'params0.json', 'params1.json'):
        assert (on_ray / name).read_text() == (plain / name).read_text(), name
    assert sorted(os.listdir(on_ray / 'checkpoints')) == sorted(os.listdir(plain / 'checkpoints'))
    # --resume on the cluster fits nothing again
    status, out = run(['--input', batch, '--output', on_ray, '--ray', 'local', '--resume', '--set', 'clusterCpus=1']
                      + STAGE1 + ict(ict_folder), capsys)
    assert out.count('already fitted, skipped (--resume)') == 2


def test_joining_a_running_ray_cluster(batch, ict_folder, tmp_path, capsys):
    import subprocess
    import sys
    pytest.importorskip('ray')
    ray = os.path.join(os.path.dirname(sys.executable), 'ray')
    started = subprocess.run([ray, 'start', '--head', '--num-cpus', '2', '--include-dashboard', 'false',
                              '--disable-usage-stats'], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        single = tmp_path / 'one'
        single.mkdir()
        (single / 'a.png').write_bytes((batch / 'a.png').read_bytes())
        status, out = run(['--input', single, '--output', tmp_path / 'out', '--ray', 'auto', '--set', 'clusterCpus=2']
                          + STAGE1 + ict(ict_folder), capsys)
    finally:
        subprocess.run([ray, 'stop', '--force'], capture_output=True, timeout=120)
    assert status == 0, out
    entry = report(tmp_path / 'out')['images'][0]
    assert entry['status'] == 'fitted' and entry['where'] != f'{os.uname().nodename} pid {os.getpid()}'
    assert (tmp_path / 'out' / 'mesh0.obj').stat().st_size > 0
