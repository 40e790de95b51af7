"""Measures hot-reload latency: from renaming a new plugin version into the plugin directory to
that version serving (as the admin endpoint reports), cold (a component never seen, so it is
compiled) and cached (a component already in the artifact cache). Prints medians.

Usage: python3 scripts/measure-reload.py KEEPWARM_BINARY ROW_CACHE_WASM REDIS_URL [RUNS]
"""

import hashlib, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time, urllib.request


def content_hash(wasm, manifest):
    h = hashlib.sha256()
    h.update(len(wasm).to_bytes(8, "little"))
    h.update(wasm)
    h.update(manifest)
    return h.hexdigest()[:12]


def custom_section(tag):
    name = b"keepwarm-bench"
    payload = bytes([len(name)]) + name + tag
    size = len(payload)
    leb = bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        leb.append(byte | (0x80 if size else 0))
        if not size:
            break
    return b"\x00" + bytes(leb) + payload


def main():
    binary, wasm_path, redis_url = sys.argv[1:4]
    runs = max(3, int(sys.argv[4]) if len(sys.argv) > 4 else 7)
    base = open(wasm_path, "rb").read()
    manifest = b'[config]\nkey = "bench:{table}:{pks}"\n'
    work = tempfile.mkdtemp(prefix="kw-reload-")
    plugins = os.path.join(work, "plugins")
    os.mkdir(plugins)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = os.path.join(work, "keepwarm.toml")
    open(config, "w").write(
        f'[redis]\nurl = "{redis_url}"\n[plugins]\ndir = "{plugins}"\n[admin]\nlisten = "127.0.0.1:{port}"\n'
        f'[[source]]\nkind = "redis-stream"\nstream = "kw-reload-bench"\ngroup = "kw"\n'
    )

    def deploy(wasm):
        open(os.path.join(plugins, "row-cache.toml"), "wb").write(manifest)
        tmp = os.path.join(plugins, ".row-cache.wasm.tmp")
        open(tmp, "wb").write(wasm)
        start = time.monotonic()
        os.rename(tmp, os.path.join(plugins, "row-cache.wasm"))
        return start

    def wait_version(version):
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/plugins", timeout=2).read()
                if any(p.get("version") == version and p.get("state") == "serving" for p in json.loads(body)):
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.002)

    deploy(base)
    daemon = subprocess.Popen([binary, "run", "--config", config], stderr=subprocess.DEVNULL)
    try:
        wait_version(content_hash(base, manifest))
        cold, cached = [], []
        versions = []
        for i in range(runs):
            wasm = base + custom_section(f"run-{i}-{time.time_ns()}".encode())
            versions.append(wasm)
            start = deploy(wasm)
            cold.append(wait_version(content_hash(wasm, manifest)) - start)
        for i in range(runs):
            # Alternate between two versions seen before: both are in the artifact cache.
            wasm = versions[i % 2]
            start = deploy(wasm)
            cached.append(wait_version(content_hash(wasm, manifest)) - start)
        print(f"reload latency (rename to serving), {runs} runs each:")
        print(f"  cold (compiled):      median {statistics.median(cold) * 1000:.0f} ms  {[round(c * 1000) for c in cold]}")
        print(f"  cached (artifact):    median {statistics.median(cached) * 1000:.0f} ms  {[round(c * 1000) for c in cached]}")
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
