#!/usr/bin/env python3
"""Redis's instructions per message for keepwarm's writes, plain against versioned, under callgrind.

Starts a private redis-server under `valgrind --tool=callgrind`, sends N bench-shaped messages
(95% SET of a ~850-byte record, 5% DEL, over 10,000 rows) the way the applier does, and prints
Redis's total instruction count:

- plain: each batch one pipeline of SET/DEL (what `consistency = "plain"` sends);
- versioned: each batch one EVALSHA of host/src/applier/versioned.lua, the data key and its
  companion per message, then the version and the operation (what `Calls` in versioned.rs
  builds).

Two alternatives to the script, measured to see what they would buy (docs/bench.md, round 5),
not what keepwarm sends:

- multi: per batch, one pipeline of HGET of each companion, then MULTI, per message SET, HSET of
  the companion and PERSIST (a delete: DEL, HSET, PEXPIRE), EXEC: the commands a transaction in
  place of the script would run, without the guard;
- watch: the same, with the companions WATCHed first (what makes it safe against other writers).

And what the applier sends since contract v5 (docs/bench.md, round 6):

- watched: per batch, chunks of 128 companions (`--chunk`): WATCH, EXISTS and MGET them, then
  MULTI, one MSET of the newer values beside their versions, one DEL of the deleted keys and
  their tombstones, EXEC (applier/watched.rs), a companion MGET did not answer told from a hash
  by TYPE only when EXISTS counts more keys than MGET answered (`--by-type`: TYPE for every
  one, without EXISTS, as before round 9); the messages whose companion is a hash go in one
  EVALSHA of versioned.lua after the transactions.

`--script PATH` profiles another Lua script in place of versioned.lua (same keys and arguments).

The stream's own commands (XREADGROUP, XACK) are left out: both modes pay them alike. Run two
sizes; (count at the larger - count at the smaller) / (difference of sizes) is the cost per
message, start-up cancelled out (docs/bench.md, "Versioned writes: where Redis's time goes"):

    scripts/profile-versioned-redis.py plain 2000;     scripts/profile-versioned-redis.py plain 12000
    scripts/profile-versioned-redis.py versioned 2000; scripts/profile-versioned-redis.py versioned 12000
    scripts/profile-versioned-redis.py versioned 6000 --batch 1 --keep   # keeps the callgrind file

Needs redis-server and valgrind; uses only the standard library.
"""

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "host", "src", "applier", "versioned.lua")
STATUSES = ["pending", "paid", "packed", "shipped", "delivered"]


def command(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class Redis:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")


def record(rng, row, i):
    r = rng.getrandbits(64)
    return (
        f'{{"id":{row},"customer_id":{row % 9973 + 1},"status":"{STATUSES[r % 5]}",'
        f'"currency":"EUR","total_amount":"{(r >> 20) % 1000}.{(r >> 8) % 100:02}",'
        f'"shipping_weight_kg":{(r >> 12) % 20}.25,"is_gift":{"true" if r & 1 else "false"},'
        f'"created_at":"2025-03-14T09:26:53.589793Z",'
        f'"updated_at":"2025-03-14T09:{i // 60 % 60:02}:{i % 60:02}.601022Z",'
        f'"shipping_address":{{"line1":"{row} Keizersgracht","city":"Amsterdam",'
        f'"postcode":"1015 CJ","country":"NL"}},"notes":"{"n" * 200}"}}'
    )


def transaction(redis, changes, watch):
    """The changes as a transaction: the companions read (and watched), then MULTI ... EXEC."""
    companions = list(dict.fromkeys(vkey for _, vkey, _, _ in changes))
    reads = [command("HGET", vkey, "") for vkey in companions]
    pipeline = ([command("WATCH", *companions)] if watch else []) + reads
    redis.send(b"".join(pipeline))
    for _ in pipeline:
        redis.reply()
    pipeline = [command("MULTI")]
    for key, vkey, version, value in changes:
        if value is None:
            pipeline += [command("DEL", key), command("HSET", vkey, "", version),
                         command("PEXPIRE", vkey, 86_400_000)]
        else:
            pipeline += [command("SET", key, value), command("HSET", vkey, "", version),
                         command("PERSIST", vkey)]
    pipeline.append(command("EXEC"))
    redis.send(b"".join(pipeline))
    for _ in pipeline:
        redis.reply()


def evalsha(redis, sha, changes):
    """The changes in one call of the versioned script."""
    keys, argv = [], [86_400_000]
    for key, vkey, version, value in changes:
        keys += [key, vkey]
        argv += [version] + (["DEL"] if value is None else ["SET", value, ""])
    redis.send(command("EVALSHA", sha, len(keys), *keys, *argv))
    redis.reply()


def watched(redis, sha, changes, chunk=128, by_type=False):
    """The changes the way the applier sends them: transactions, the script for the rest."""
    rest = []
    for first in range(0, len(changes), chunk):
        part = changes[first:first + chunk]
        companions = list(dict.fromkeys(vkey for _, vkey, _, _ in part))
        if by_type:
            redis.send(command("WATCH", *companions) + command("MGET", *companions))
            redis.reply()
            existing = None
        else:
            redis.send(command("WATCH", *companions) + command("EXISTS", *companions)
                       + command("MGET", *companions))
            redis.reply()
            existing = int(redis.reply())
        held = dict(zip(companions, redis.reply()))
        # A new key (no companion) is told from a hash by TYPE, when EXISTS counts more keys
        # than MGET answered (or always, with --by-type: the applier before round 9).
        unread = [vkey for vkey in companions if held[vkey] is None]
        if existing is not None and existing <= len(companions) - len(unread):
            held.update((vkey, b"") for vkey in unread)
            unread = []
        if unread:
            redis.send(b"".join(command("TYPE", vkey) for vkey in unread))
            for vkey in unread:
                held[vkey] = b"" if redis.reply() == b"none" else None
        # Each key's last write only.
        last = {}
        for key, vkey, version, value in part:
            stored = held[vkey]
            if stored is None or (stored and len(stored) != 41):
                rest.append((key, vkey, version, value))
                continue
            if stored and stored.decode() > version:
                continue
            held[vkey] = version.encode()
            last[key] = (vkey, version, value)
        if not last:
            redis.send(command("UNWATCH"))
            redis.reply()
            continue
        mset = [arg for key, (vkey, version, value) in last.items() if value is not None
                for arg in (key, value, vkey, version)]
        deleted = [key for key, (_, _, value) in last.items() if value is None]
        writes = ([command("MSET", *mset)] if mset else []) + \
            ([command("DEL", *deleted)] if deleted else []) + \
            [command("SET", last[key][0], last[key][1], "PX", 86_400_000) for key in deleted]
        pipeline = [command("MULTI")] + writes + [command("EXEC")]
        redis.send(b"".join(pipeline))
        for _ in pipeline:
            redis.reply()
    if rest:
        evalsha(redis, sha, rest)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["plain", "versioned", "multi", "watch", "watched"])
    parser.add_argument("messages", type=int)
    parser.add_argument("--batch", type=int, default=256, help="messages per pipeline or call")
    parser.add_argument("--script", default=SCRIPT, help="the Lua script of the versioned mode")
    parser.add_argument("--keep", action="store_true", help="keep and name the callgrind file")
    parser.add_argument("--chunk", type=int, default=128, help="companions per transaction")
    parser.add_argument("--by-type", action="store_true",
                        help="watched: TYPE for each companion MGET did not answer, no EXISTS")
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tempfile.mktemp(prefix="keepwarm-redis-callgrind.")
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server",
         "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            redis = Redis(port)
            redis.send(command("PING"))
            redis.reply()
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit("redis-server did not start")
    if args.mode in ("versioned", "watched"):
        redis.send(command("SCRIPT", "LOAD", open(args.script).read()))
        sha = redis.reply()

    rng = random.Random(7)
    lsn = 1000
    sent = 0
    while sent < args.messages:
        batch = min(args.batch, args.messages - sent)
        sent += batch
        pipeline, changes = [], []
        for _ in range(batch):
            lsn += 1
            row = rng.randrange(1, 10_001)
            key = f"public.orders:{row}"
            delete = rng.random() < 0.05
            value = None if delete else record(rng, row, lsn)
            if args.mode == "plain":
                pipeline.append(command("DEL", key) if delete else command("SET", key, value))
            else:
                changes.append((key, "kw:v:{" + key + "}", f"{lsn:020}:{0:020}", value))
        if args.mode == "plain":
            redis.send(b"".join(pipeline))
            for _ in range(batch):
                redis.reply()
        elif args.mode in ("multi", "watch"):
            transaction(redis, changes, args.mode == "watch")
        elif args.mode == "watched":
            watched(redis, sha, changes, args.chunk, args.by_type)
        else:
            evalsha(redis, sha, changes)
    redis.send(command("SHUTDOWN", "NOSAVE"))
    try:
        redis.reply()
    except (OSError, RuntimeError):
        pass
    server.wait()
    with open(out) as profile:
        total = next(line.split()[1] for line in profile if line.startswith(("summary:", "totals:")))
    print(f"{args.mode} {args.messages} messages, batches of {args.batch}: {total} instructions")
    if args.keep:
        print(f"callgrind file: {out}")
    else:
        os.unlink(out)


if __name__ == "__main__":
    main()
