"""What the checks on bad input cost `mindlink train` before it starts: `python scripts/bench_validation.py [ROOT]`.

Times, on a MiniNSD at the demo's size (written to a temp folder unless ROOT is given), each check `train` makes
before any work: parsing and checking the arguments and the config (`build_parser`, `make_config`: every field's type
and range), the device, the data fingerprint of the files the run prepares from (`data_fingerprint`), the run lock
(`RunLock`) and the comparison with a run's record (`check_record`). Each is the median of `--repeat` calls.
"""
import argparse, statistics, sys, tempfile, time
from pathlib import Path


def median_seconds(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('root', nargs='?', type=Path, help="a MiniNSD or NSD root (default: the demo's MiniNSD, written once)")
    ap.add_argument('--repeat', type=int, default=20)
    a = ap.parse_args(argv)
    from mindlink.cli import build_parser, make_config
    from mindlink.data import NSDReader
    from mindlink.mininsd import DEMO_MINI_NSD, make_mini_nsd
    from mindlink.prepare import data_fingerprint
    from mindlink.runs import RunLock, check_record
    from mindlink.utils import get_device
    tmp = Path(tempfile.mkdtemp())
    root = a.root or make_mini_nsd(tmp / 'mini', seed=0, show_progress=False, **DEMO_MINI_NSD)
    reader, subjects = NSDReader(root), [1, 2, 3, 4]
    argv = ['train', '--data', str(root), '--out', str(tmp / 'run'), '--subjects', '1', '2', '3', '4',
            '--set', 'lr=3e-3', '--set', 'use_subject_loss=false', '--set', 'betas=[0.9, 0.99]']
    fp = data_fingerprint(reader, subjects)
    rec = dict(subjects=subjects, test_split='shared982', fingerprint=fp)
    def lock():
        RunLock(tmp / 'run').release()
    checks = {
        'arguments and config (parse, every field typed and ranged)': lambda: make_config('tiny', None, build_parser().parse_args(argv).set),
        'device': lambda: get_device('cpu'),
        f'data fingerprint ({len(subjects)} subjects)': lambda: data_fingerprint(NSDReader(root), subjects),
        'run lock (take and release)': lock,
        "the run's record against the data": lambda: check_record(rec, dict(rec, fingerprint=data_fingerprint(reader, subjects)), tmp),
    }
    total = 0.0
    print(f'{root}: median of {a.repeat} calls each')
    for name, f in checks.items():
        s = median_seconds(f, a.repeat); total += s
        print(f'  {name:62s} {s * 1e3:8.2f} ms')
    print(f'  {"all of them":62s} {total * 1e3:8.2f} ms')
    return total


if __name__ == '__main__':
    sys.exit(0 if main() < 1.0 else 1)
