"""A batch on a Ray cluster (``--ray auto|local|ADDRESS``): every photo (or the one group of a
shared identity) is a task on a pool of workers, each of which loads the model once, keeps
Mitsuba's compiled kernels between its photos and sends the results back to this process, which
writes them into ``--output``: no file system is shared. A worker that dies is restarted and its
task retried (MAX_RETRIES); a photo that fails on its own (no face) is reported, not retried.
"""
import dataclasses
import os
import socket
import tempfile
import time

import torch
from tqdm import tqdm

import checkpoints
import config as config_module
import fitting
import landmarks as landmarks_module
import modelFiles
import photos
import results
import utils
from config import Config

MAX_RETRIES = 2  # restarts of a dead worker, and retries of the task it held


class FitWorker:
    """A Ray actor: the model and the landmark detector, loaded once; fits photos sent as bytes
    with ``fit_group`` (the command line's: ``optimizer.fit_group``)."""

    def __init__(self, config: Config, landmarks_given: bool, fit_group):
        torch.set_num_threads(config.clusterCpus)
        self.config, self.fit_group = config, fit_group
        self.model = modelFiles.load_model(config)
        self.detector = None if landmarks_given else landmarks_module.make_detector(config.lamdmarksDetectorType,
                                                                                    config.device)

    def fit(self, group: list, shared_identity: bool, key: str) -> dict:
        """``group``: photos as dicts (index, path, data: the file's bytes, landmarks: the text of
        their landmark file or None), fitted together if ``shared_identity`` -> dict: status
        ('fitted' or 'failed'), error, seconds, where, files {relative path: bytes} of the results."""
        start = time.perf_counter()
        where = f'{socket.gethostname()} pid {os.getpid()}'
        with tempfile.TemporaryDirectory(prefix='faceRecon-worker-') as folder:
            try:
                images = [self.read(photo, folder) for photo in group]
                output = os.path.join(folder, 'output')
                self.fit_group(self.model, images, self.config, shared_identity, output, key, False)
            except (photos.InputError, fitting.FitError, results.WriteError, checkpoints.CheckpointError) as error:
                message = str(error)
                for photo in group:  # the worker's copies -> the photos' own paths
                    message = message.replace(os.path.join(folder, str(photo['index']), os.path.basename(photo['path'])),
                                              photo['path'])
                return dict(status='failed', error=message, seconds=time.perf_counter() - start, where=where)
            files = folder_files(output)
        return dict(status='fitted', error=None, seconds=time.perf_counter() - start, where=where, files=files)

    def read(self, photo: dict, folder: str) -> photos.FitImage:
        """One photo of a task, written to the worker's folder and read as the command line reads it."""
        own = os.path.join(folder, str(photo['index']))
        os.makedirs(own)
        path = os.path.join(own, os.path.basename(photo['path']))
        with open(path, 'wb') as file:
            file.write(photo['data'])
        landmark_file = None
        if photo['landmarks'] is not None:
            landmark_file = os.path.join(own, 'landmarks.txt')
            utils.write_text(landmark_file, photo['landmarks'])
        image = photos.prepare_image(photo['index'], path, self.config, self.detector, landmark_file)
        return dataclasses.replace(image, path=photo['path'])


def folder_files(folder: str) -> dict:
    """Every file under ``folder`` -> {path relative to it: its bytes}."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), 'rb') as file:
                files[os.path.relpath(os.path.join(root, name), folder)] = file.read()
    return files


def connect(address: str):
    """Join the Ray cluster at ``address`` ('auto': the running one; 'local': start one on this
    machine) -> the ray module."""
    import ray
    try:
        if address == 'local':  # a new one, even where another runs here
            ray.init(address='local', include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise config_module.ConfigError(f"--ray {address}: cannot join a Ray cluster ({error}); start one with "
                                        f"'ray start --head', or use --ray local") from None
    return ray


def worker_resources(config: Config, cluster: dict) -> tuple:
    """(Ray resources of one worker, how many fit into the cluster's ``cluster`` resources)."""
    if config.device == 'cuda':
        need, have = dict(num_gpus=1, num_cpus=1), int(cluster.get('GPU', 0))
        what = 'GPUs'
    else:
        need, have = dict(num_cpus=config.clusterCpus), int(cluster.get('CPU', 0) // config.clusterCpus)
        what = f'times {config.clusterCpus} CPUs (clusterCpus)'
    if have < 1:
        raise config_module.ConfigError(f"the Ray cluster has {cluster.get('CPU', 0):.0f} CPUs and "
                                        f"{cluster.get('GPU', 0):.0f} GPUs: no worker fits (one takes 1 of its {what})")
    return need, have


def photo_task(index: int, path: str, landmarks_path: str) -> dict:
    """A photo as a task sends it: its bytes and its landmark file's text (or None)."""
    with open(path, 'rb') as file:
        data = file.read()
    landmarks = None
    if landmarks_path:
        landmark_file = landmarks_module.landmark_file_for(landmarks_path, path)
        try:
            with open(landmark_file, encoding='utf-8') as file:
                landmarks = file.read()
        except OSError as error:
            raise photos.InputError(f'{landmark_file}: cannot read landmarks ({error.strerror})') from None
    return dict(index=index, path=os.path.abspath(path), data=data, landmarks=landmarks)


def fit_on_ray(args, config: Config, indexed: list, fit_group, final_stage: int, part: str = '') -> int:
    """``optimizer.fit_inputs`` on a Ray cluster: the photos ``indexed`` [(output index, path)]
    as tasks that ``fit_group`` fits, the results written into ``args.output`` as they come back;
    ``final_stage``: the last stage the config runs (a photo with its checkpoint is done); ``part``:
    a shard's manifest; -> exit status."""
    fingerprint = checkpoints.config_fingerprint(config)
    manifest = checkpoints.Manifest.begin(args.output, fingerprint, args.resume, part)
    failures = 0

    def fail(group: list, message: str, seconds: float = 0.0, where: str = '') -> None:
        nonlocal failures
        for photo in group:
            failures += 1
            manifest.report_on(photo[0], photo[1], 'failed', message, seconds, where)
        manifest.save(fingerprint)
        print(f'error: {message}')

    tasks = []  # (photos [(index, path, digest)], shared identity, checkpoint key)
    listed = [(index, path, checkpoints.file_digest(path)) for index, path in indexed]
    if args.sharedIdentity:
        tasks.append((listed, True, checkpoints.batch_key([digest for _, _, digest in listed])))
    else:
        for index, path, digest in listed:
            key = checkpoints.image_key(digest)
            if args.resume and manifest.finished(index, digest, key, final_stage):
                print(f'[{index}] {path}: already fitted, skipped (--resume)')
                continue
            tasks.append(([(index, path, digest)], False, key))
    if not tasks:
        print(f'done: nothing left to fit; results in {os.path.abspath(args.output)}')
        return 0

    ray = connect(args.ray)
    try:
        need, slots = worker_resources(config, ray.cluster_resources())
        actor = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES, **need)(FitWorker)
        workers = [actor.remote(config, bool(args.landmarks), fit_group) for _ in range(min(slots, len(tasks)))]
        print(f'Ray: {len(workers)} workers ({", ".join(f"{k} {v}" for k, v in need.items())} each) for {len(tasks)} '
              f'task(s)')
        pending, running, idle = list(reversed(tasks)), {}, list(workers)
        with tqdm(total=len(tasks), desc='images', unit='task') as progress:
            while pending or running:
                while pending and idle:
                    task = pending.pop()
                    try:
                        group = [photo_task(index, path, args.landmarks) for index, path, _ in task[0]]
                    except (photos.InputError, OSError) as error:
                        fail(task[0], str(error))
                        progress.update(1)
                        continue
                    worker = idle.pop()
                    running[worker.fit.remote(group, task[1], task[2])] = (worker, task)
                if not running:
                    if pending:  # every worker died
                        for task in pending:
                            fail(task[0], 'no worker left: every worker died more than MAX_RETRIES times')
                        pending = []
                    continue
                [reference], _ = ray.wait(list(running), num_returns=1)
                worker, task = running.pop(reference)
                try:
                    outcome = ray.get(reference)
                except ray.exceptions.RayError as error:  # its worker died, and again after every restart
                    paths = ', '.join(path for _, path, _ in task[0])
                    fail(task[0], f'{paths}: its worker died {MAX_RETRIES + 1} times ({type(error).__name__})')
                else:
                    idle.append(worker)
                    if outcome['status'] == 'fitted':
                        write_files(args.output, outcome['files'])
                        for index, path, digest in task[0]:
                            manifest.record(index, path, digest, task[2], outcome['seconds'] / len(task[0]),
                                            outcome['where'])
                        manifest.save(fingerprint)
                    else:
                        fail(task[0], outcome['error'], outcome['seconds'], outcome['where'])
                progress.update(1)
    finally:
        ray.shutdown()
    total = len(indexed)
    print(f'done: {total - failures} of {total} images fitted; results in {os.path.abspath(args.output)}')
    return 0 if not failures else 1


def write_files(output: str, files: dict) -> None:
    """The results a worker sent ({path relative to the output folder: bytes}), each written atomically."""
    for relative, data in files.items():
        with utils.atomic_path(os.path.join(output, relative)) as temporary:
            with open(temporary, 'wb') as file:
                file.write(data)
