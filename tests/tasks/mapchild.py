"""A program that runs TaskStore.map to the end, whatever happens to it: the
kill campaigns of test_map.py SIGKILL it (and its workers) and run it again.

    python mapchild.py DIR N [PROCESSES]

Opens DIR (sync="always", the WAL archived into DIR-archive so that the test
can read every record ever written), maps taskwork.square_logged over
range(N), reruns while items failed (a worker killed in the middle of an item
that was alone in its chunk fails it), prints "done" and exits 0. On SIGINT
(KeyboardInterrupt) it prints "interrupted" and the counts, and exits 130.
"""

from __future__ import annotations

import sys

import taskwork

import walstate
from walstate.tasks import TasksFailedError, TaskStore


def main() -> int:
    path, n = sys.argv[1], int(sys.argv[2])
    processes = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    with walstate.open(path, sync="always", archive_dir=path + "-archive",
                       segment_size=256 * 1024, max_wal_size=512 * 1024) as db:
        tasks = TaskStore(db)
        try:
            for _ in range(1000):
                try:
                    results = tasks.map(taskwork.square_logged, range(n),
                                        processes=processes, key=lambda x: f"item-{x:06d}")
                    break
                except TasksFailedError:
                    continue
        except KeyboardInterrupt:
            print("interrupted", {s.name: c for s, c in tasks.counts().items()}, flush=True)
            return 130
        assert [r[0] for r in results] == [x * x for x in range(n)]
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
