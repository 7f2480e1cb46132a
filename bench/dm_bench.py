"""Issue 2's benchmark: N user pairs exchanging persisted DMs for a fixed
time against Postbox, and the same load against a bare python-socketio
relay (and the Node socket.io relay when Node is present) in the same
invocation. Prints deliveries/s, p50/p99 delivery latency, server CPU
seconds per 1000 messages, and the ratios to the bare relay.

    python bench/dm_bench.py                    # 50 pairs, 10 s, 3 repeats
    python bench/dm_bench.py --pairs 20 --duration 5 --repeats 1

It is ``bench/run.py --only dm``; every option of run.py applies.
"""
import sys

import run

if __name__ == '__main__':
    sys.exit(run.main(['--only', 'dm', '--no-report'] + sys.argv[1:]))
