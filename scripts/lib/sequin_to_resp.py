"""Turns Sequin change messages (JSONL on stdin) into XADD commands in the Redis protocol on
stdout, shaped exactly as Sequin's Redis Stream sink writes them: one entry per message, one
field per top-level key, strings raw and everything else as JSON text (SEQUIN-FORMAT.md 2.1).

Usage: python3 sequin_to_resp.py STREAM < changes.jsonl | redis-cli --pipe
"""

import json
import sys


def resp(args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def main():
    stream = sys.argv[1]
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        # Keep each value's exact text: decode once for the shape, re-slice with raw decoding.
        message = json.loads(line)
        raw = json.loads(line, object_pairs_hook=lambda pairs: pairs)
        args = ["XADD", stream, "*"]
        for key, _ in raw:
            value = message[key]
            if isinstance(value, str):
                text = value
            else:
                text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            args += [key, text]
        sys.stdout.buffer.write(resp(args))


if __name__ == "__main__":
    main()
