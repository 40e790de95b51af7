"""XADD commands (Redis protocol, for `redis-cli --pipe`) of N stream entries shaped like the
bench workload (bench/src/workload.rs: seed 42, 100,000 rows, the same mix, sizes and fields),
for scripts/profile-per-message.sh. Usage: bench_entries.py STREAM N | redis-cli --pipe"""
import sys

M = (1 << 64) - 1
def splitmix(x):
    x = (x + 0x9e3779b97f4a7c15) & M
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & M
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & M
    return x ^ (x >> 31)

STATUSES = ["pending", "paid", "packed", "shipped", "delivered"]

def entry(seed, rows, i):
    r = splitmix(seed ^ splitmix(i))
    id_ = r % rows + 1
    pick = (r >> 32) % 100
    action = "update" if pick < 80 else "insert" if pick < 90 else "delete" if pick < 95 else "read"
    status = STATUSES[(r >> 40) % 5]
    cents = (r >> 20) % 100000
    record = ('{"id":%d,"customer_id":%d,"status":"%s","currency":"EUR","total_amount":"%d.%02d",'
              '"shipping_weight_kg":%d.25,"is_gift":%s,"created_at":"2025-03-14T09:26:53.589793Z",'
              '"updated_at":"2025-03-14T09:%02d:%02d.601022Z","shipping_address":{"line1":"%d Keizersgracht",'
              '"city":"Amsterdam","postcode":"1015 CJ","country":"NL"},"notes":"') % (
        id_, id_ % 9973 + 1, status, cents // 100, cents % 100, (r >> 12) % 20,
        "true" if r & 1 else "false", (i // 60) % 60, i % 60, id_)
    pad = []
    n = len(record)
    while n < 596:
        pad.append(chr(ord('a') + (n + i % 26) % 26)); n += 1
    record += "".join(pad) + '"}'
    changes = '{"status":"%s"}' % STATUSES[(r >> 44) % 5] if action == "update" else "null"
    lsn, idx = ("null", "null") if action == "read" else (str(1000000000 + i * 8), "0")
    metadata = ('{"table_schema":"public","table_name":"orders","commit_timestamp":"2025-03-14T09:26:53.601022Z",'
                '"commit_lsn":%s,"commit_idx":%s,"database_name":"shop-prod","transaction_annotations":null,'
                '"idempotency_key":"bench-%d","record_pks":["%d"],"enrichment":null,"consumer":{"id":"0b7e1c52-3d4f-4a8e-9c21-6f5d8e7a9b10",'
                '"name":"shop-cdc","annotations":{}},"database":{"id":"5a9c3e7d-2b1f-4c6a-8e0d-7f3b1a2c4d5e","name":"shop-prod",'
                '"annotations":{},"database":"shop","hostname":"pg-primary.internal.example.com"}}') % (lsn, idx, i, id_)
    return [("record", record), ("changes", changes), ("action", action), ("metadata", metadata)]

def resp(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        d = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(d), d))
    return b"".join(out)

stream, n = sys.argv[1], int(sys.argv[2])
w = sys.stdout.buffer
for i in range(n):
    args = ["XADD", stream, "*"]
    for k, v in entry(42, 100000, i):
        args += [k, v]
    w.write(resp(args))
