"""gs:// workdirs, against a local GCS emulator (gcp-storage-emulator): the run, its checkpoints,
metrics, TensorBoard, skip log and a study report all go to the bucket and come back.

The emulator speaks GCS's JSON API on localhost. gcsfs (epath), google-cloud-storage
(tensorboardX) and tensorstore (Orbax) are pointed at it by their own environment variables,
so the code under test is the code that talks to real GCS.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest
from etils import epath
from test_report import _results, _run, _write_study
from test_train import smoke

from sdtl_jax import checkpointing, experiment, fileio, report, workdir_guard
from sdtl_jax.data import reader

BUCKET = 'sdtl-test'
ROOT = pathlib.Path(__file__).parent.parent


def _send_generation_on_download():
    """Real GCS sends an object's generation with its bytes (x-goog-generation), and
    tensorstore's conditional writes depend on it; the emulator omits it. Adds it."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    download = objects.download
    if getattr(download, 'sends_generation', False):
        return

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (200, 206):
            obj = storage.get_file_obj(request.params['bucket_name'],
                                       request.params['object_id'])
            response['x-goog-generation'] = obj['generation']
            response['x-goog-metageneration'] = obj['metageneration']

    download_with_generation.sends_generation = True
    objects.download = download_with_generation       # objects.get calls it by name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = download_with_generation


def _honour_generation_preconditions():
    """Real GCS applies an upload's ifGenerationMatch=0 (create, never replace) and a delete's
    generation (that version only) atomically; the emulator ignores both. Adds them, one
    request at a time (the workdir lock depends on them)."""
    import threading
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    if getattr(objects.insert, 'honours_preconditions', False):
        return
    insert, delete, one_at_a_time = objects.insert, objects.delete, threading.Lock()

    def generation(storage, request, name):
        try:
            return storage.get_file_obj(request.params['bucket_name'], name)['generation']
        except NotFound:
            return None

    def insert_if_absent(request, response, storage, *args, **kwargs):
        name = (request.query['name'][0] if 'name' in request.query else
                (request.data or {}).get('meta', {}).get('name'))
        with one_at_a_time:
            if (request.query.get('ifGenerationMatch') == ['0']
                    and generation(storage, request, name) is not None):
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            return insert(request, response, storage, *args, **kwargs)

    def delete_generation(request, response, storage, *args, **kwargs):
        with one_at_a_time:
            wanted = request.query.get('generation', [None])[0]
            name = request.params['object_id']
            if wanted is not None and generation(storage, request, name) != wanted:
                response.status = HTTPStatus.NOT_FOUND
                return None
            return delete(request, response, storage, *args, **kwargs)

    insert_if_absent.honours_preconditions = True
    objects.insert, objects.delete = insert_if_absent, delete_generation
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            handlers[method] = {insert: insert_if_absent, delete: delete_generation}.get(
                handler, handler)


@pytest.fixture(scope='module')
def bucket():
    from gcp_storage_emulator.server import create_server
    _send_generation_on_download()
    _honour_generation_preconditions()
    with socket.socket() as s:
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    server = create_server('localhost', port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f'http://localhost:{port}'
    env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               NO_GCE_CHECK='True')      # google-auth: no metadata server to wait for here
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f'gs://{BUCKET}'
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_fileio_in_a_bucket(bucket):
    path = f'{bucket}/io/a.json'
    assert fileio.is_remote(path) and fileio.absolute(path) == path
    assert not fileio.exists(path)
    fileio.write_text(path, '{"x": 1}')
    assert json.loads(fileio.read_text(path)) == {'x': 1}
    log = f'{bucket}/io/log.txt'
    fileio.append_text(log, 'one\n')
    fileio.append_text(log, 'two\n')
    assert fileio.read_text(log) == 'one\ntwo\n'
    assert fileio.isdir(f'{bucket}/io')
    assert fileio.glob(f'{bucket}/io', '*.txt') == [log]
    assert fileio.glob(f'{bucket}/nothing', '*.txt') == []


def test_skip_log_is_uploaded_per_process_and_survives_a_new_machine(bucket):
    workdir = f'{bucket}/skips'
    log = reader.SkipLog(workdir, process_index=1)
    assert not fileio.is_remote(log.path)          # grain workers append to a local file
    with open(log.path, 'a') as f:
        f.write('shard-0, record 3\tbad\n')
    log.sync()
    assert fileio.exists(f'{workdir}/skipped_records.process_1.txt')
    # The run resumes elsewhere: the local copy starts from the bucket's, not empty.
    again = reader.SkipLog(workdir, process_index=1)
    with open(again.path, 'a') as f:
        f.write('shard-1, record 0\tbad\n')
    again.sync()
    assert reader.count_skipped(workdir) == 2


def test_run_with_a_gs_workdir(bucket, tmp_path):
    data_dir = str(tmp_path / 'data')
    workdir = f'{bucket}/runs/transfer'
    results = experiment.run(smoke('real_to_synth', 'num_frozen=16', data_dir), workdir)
    run = epath.Path(workdir)
    assert json.loads((run / 'results.json').read_text()) == results
    assert results['source'] == f'{workdir}/source'
    assert (run / 'source' / 'results.json').exists()
    lines = (run / 'metrics.jsonl').read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])['num_images'] == 360
    assert (run / 'config.json').exists() and (run / 'train_subset.json').exists()
    assert any((run / 'tensorboard').iterdir())
    params, _, step = checkpointing.load_variables(workdir)
    assert step == results['steps'] and 'head' in params
    # Finished runs are found in the bucket and reused: nothing trains again.
    assert experiment.run(smoke('real_to_synth', 'num_frozen=16', data_dir), workdir) == results


def test_report_of_a_study_in_a_bucket(bucket, tmp_path):
    local = tmp_path / 'study'
    _write_study(local, 'augmentations', 'digits', 'resnet50',
                 [_run('R_multicrop', domain='real'), _run('S_multicrop', domain='synth')],
                 {'R_multicrop': _results(80.0, 95.0)})        # S is pending
    remote = f'{bucket}/studies/aug'
    for path in local.rglob('*'):
        if path.is_file():
            fileio.write_bytes(f'{remote}/{path.relative_to(local)}', path.read_bytes())
    out = report.write_report(remote)
    assert out['report'] == f'{remote}/report.md'
    text = fileio.read_text(out['report'])
    assert '80.0' in text and 'pending' in text
    assert epath.Path(out['figures'][0]).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    shutil.rmtree(local)


# A run taking a workdir's lock at a given instant: a process of its own, as fsspec's
# filesystems are not fork-safe. Prints 'got it' or 'refused'; a holder lives on a while, or
# the others would rightly take over the lock of a dead run.
TAKE_LOCK_AT = """import sys, time
from sdtl_jax import workdir_guard
workdir, at = sys.argv[1], float(sys.argv[2])
lock = workdir_guard.RunLock(workdir)
time.sleep(max(0.0, at - time.time()))
try:
    lock.acquire()
    print('got it', flush=True)
    time.sleep(2)
except workdir_guard.WorkdirError:
    print('refused')
"""


@pytest.mark.parametrize('stale', [False, True])
def test_two_runs_started_at_once_never_both_get_a_bucket_lock(bucket, stale):
    """In a bucket the lock is created with generation 0 as the precondition, and a stale one
    deleted at its generation only: of runs started at the same instant exactly one holds it.
    (Checking, then writing, let both in.)"""
    for trial in range(2):
        workdir = f'{bucket}/locks/{stale}/{trial}'
        if stale:
            fileio.write_text(f'{workdir}/{workdir_guard.LOCK_FILE}', json.dumps(
                {'host': 'other-vm', 'pid': 1, 'heartbeat': time.time() - 3600}))
        at = str(time.time() + 3)       # after every process has imported what it needs
        runs = [subprocess.Popen([sys.executable, '-c', TAKE_LOCK_AT, workdir, at],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
                for _ in range(3)]
        outcomes = sorted(run.communicate(timeout=120)[0].strip() for run in runs)
        assert outcomes == ['got it', 'refused', 'refused'], (trial, outcomes)
        holder = json.loads(fileio.read_text(f'{workdir}/{workdir_guard.LOCK_FILE}'))
        assert holder['pid'] in {r.pid for r in runs}
