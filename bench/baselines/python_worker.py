"""BASELINE (b): the worker a user would hand-write from Sequin's Redis Stream guide.

Python with redis-py: XREADGROUP batches, JSON parse, a pipeline of SET/DEL (row-cache's
transform: key "{schema}.{table}:{pks}", the record JSON as the value), then XACK.

Usage: python_worker.py REDIS_URL STREAM GROUP
"""

import json
import sys

import redis


def main():
    url, stream, group = sys.argv[1], sys.argv[2], sys.argv[3]
    r = redis.Redis.from_url(url)
    while True:
        reply = r.xreadgroup(group, "python", {stream: ">"}, count=500, block=1000)
        if not reply:
            continue
        for _, entries in reply:
            pipe = r.pipeline(transaction=False)
            ids = []
            for entry_id, fields in entries:
                ids.append(entry_id)
                metadata = json.loads(fields[b"metadata"])
                record_text = fields[b"record"]
                record = json.loads(record_text)
                action = fields[b"action"].decode()
                pks = ":".join(str(pk) for pk in metadata["record_pks"])
                key = f"{metadata['table_schema']}.{metadata['table_name']}:{pks}"
                toast = action == "update" and "unchanged_toast" in record.values()
                if action == "delete" or toast:
                    pipe.delete(key)
                else:
                    pipe.set(key, record_text)
            pipe.execute()
            r.xack(stream, group, *ids)


if __name__ == "__main__":
    main()
