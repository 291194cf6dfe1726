"""The test command can fail: a broken assert fails nbdev_test, and a failing cell fails the book build."""
import json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _nb(*cells):
    mk = lambda t, s: {'cell_type': t, 'metadata': {}, 'source': s, **({'outputs': [], 'execution_count': None} if t == 'code' else {})}
    return {'cells': [mk(t, s) for t, s in cells], 'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}},
            'nbformat': 4, 'nbformat_minor': 5}


def test_broken_assert_fails_nbdev_test(tmp_path):
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    (tmp_path / 'nbs').mkdir()
    nb = json.loads((ROOT / 'nbs' / '90_utils.ipynb').read_text())
    good = tmp_path / 'nbs' / 'good.ipynb'; good.write_text(json.dumps(nb))
    r = subprocess.run([BIN / 'nbdev_test', '--path', good], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    nb['cells'].append({'cell_type': 'code', 'metadata': {}, 'outputs': [], 'execution_count': None,
                        'source': 'from fastcore.test import test_eq\ntest_eq(get_device().type, "no-such-device")'})
    bad = tmp_path / 'nbs' / 'bad.ipynb'; bad.write_text(json.dumps(nb))
    r = subprocess.run([BIN / 'nbdev_test', '--path', bad], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and 'no-such-device' in r.stderr + r.stdout


def test_failing_cell_fails_book_build(tmp_path):
    shutil.copytree(ROOT / 'scripts', tmp_path / 'scripts')
    shutil.copytree(ROOT / 'book', tmp_path / 'book')
    (tmp_path / 'nbs').mkdir()
    (tmp_path / 'nbs' / '00_index.ipynb').write_text(json.dumps(_nb(
        ('markdown', '# A book\n\nEinstein: $E = mc^2$'), ('code', 'raise RuntimeError("cell failed on purpose")'))))
    r = subprocess.run([sys.executable, tmp_path / 'scripts' / 'build_book.py', '--only'], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0, 'a failing cell must fail the book build'
    assert 'cell failed on purpose' in r.stdout + r.stderr


def _alive(pid: int) -> bool:
    "The process exists and is not a zombie."
    try: state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError): return False
    return state != 'Z'


def test_map_jobs_workers_end_with_their_parent(tmp_path):
    "A killed `mindlink experiments` leaves no worker training on into its run folders (they would race its next call)."
    import signal, time
    script = tmp_path / 'parent.py'
    script.write_text('import time\nfrom mindlink.utils import map_jobs\nif __name__ == "__main__": map_jobs(time.sleep, [120, 120, 120], jobs=2)\n')
    parent = subprocess.Popen([sys.executable, script], cwd=ROOT)
    try:
        workers, t0 = [], time.time()
        while len(workers) < 2 and time.time() - t0 < 60:         # the two spawned workers, once they run
            time.sleep(0.5)
            kids = subprocess.run(['pgrep', '-P', str(parent.pid)], capture_output=True, text=True).stdout.split()
            workers = [int(k) for k in kids if 'spawn_main' in Path(f'/proc/{k}/cmdline').read_text(errors='replace')
                       and 'resource_tracker' not in Path(f'/proc/{k}/cmdline').read_text(errors='replace')] if kids else []
        assert len(workers) == 2, 'the workers did not start'
        time.sleep(2)                                                # past the initializer: the watchdogs run
        parent.send_signal(signal.SIGTERM); parent.wait(10)
        t0 = time.time()
        while any(_alive(w) for w in workers) and time.time() - t0 < 15: time.sleep(0.5)
        assert not any(_alive(w) for w in workers), 'a worker outlived its parent'
    finally:
        if parent.poll() is None: parent.kill()
        for w in workers if 'workers' in locals() else []:
            if _alive(w): os_kill = __import__('os').kill; os_kill(w, signal.SIGKILL)
