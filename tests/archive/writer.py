"""A writer process for the archive tests: steady durable puts of keys
k00000000, k00000001, ... (value: the index), printing after each
acknowledged put ``<index> <lsn> <time.time()>``; runs until killed.

    python writer.py DIR ARCHIVE_URL ARCHIVE_INTERVAL [SLEEP] [SEGMENT_SIZE]
"""

import sys
import time

import walstate


def main() -> None:
    path, url, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    seg = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 20
    db = walstate.open(path, archive=url, archive_interval=interval, segment_size=seg,
                       max_wal_size=4 * seg, checkpoint_timeout=1.0)
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    i = 0
    while True:
        lsn = db.put(b"k%08d" % i, b"%d" % i + b"." * 100)
        out.write(f"{i} {lsn} {time.time():.6f}\n")
        out.flush()
        i += 1
        if pause:
            time.sleep(pause)


if __name__ == "__main__":
    main()
