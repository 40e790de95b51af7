"""sdk-probe-python: answers "probe" records with what the keepwarm_guest helper makes of them,
so that tests/all/languages.rs can check the helper inside the component through
`keepwarm test`. Each change's record is {"probe": NAME, ...}; the answer is a list of
operations."""

import json

from keepwarm_guest import KeyTemplate, Plugin, export_plugin, key_part, log, ops


class Probe(Plugin):
    def __init__(self, config):
        if "fail" in config:
            raise ValueError(f"asked to fail: {config['fail']}")

    def handle(self, change):
        record = change.record()
        probe = record["probe"]
        if probe == "json":
            value = record["value"]
            return [ops.set("json", json.dumps(value, separators=(",", ":"))), ops.set("type", type(value).__name__)]
        if probe == "score":
            return [ops.sorted_set_add("z", [(record["value"], "m")])]
        if probe == "key":
            return [ops.set(KeyTemplate(record["template"]).render(change), "x")]
        if probe == "key-part":
            return [ops.set(key_part(record["value"]), "x")]
        if probe == "utf8":
            return [ops.set("text", record["value"])]
        if probe == "change":
            log.info(f"probing {change.action} of {change.table}")
            summary = {
                "action": change.action,
                "schema": change.schema,
                "table": change.table,
                "pks": change.pks,
                "version": change.version(),
                "old": change.old_values(),
                "toast": change.has_unchanged_toast(),
                "isDelete": change.is_delete,
                "timestamp": change.commit_timestamp,
                "idempotencyKey": change.idempotency_key,
                "metadataKeys": sorted(change.metadata()),
            }
            return [ops.set("change", json.dumps(summary, separators=(",", ":")))]
        if probe == "all-ops":
            return [
                ops.set("s", "v", 1500),
                ops.set("b", bytes([0, 255])),
                ops.delete(7),
                ops.hash_set("h", {"a": "1", "b": "2"}),
                ops.hash_set("h2", [("c", "3")]),
                ops.hash_del("h", ["a"]),
                ops.set_add("set", ["x", 9007199254740993]),
                ops.set_remove("set", ("y",)),
                ops.sorted_set_add("z", [("149.90", "p"), (2, "q")]),
                ops.sorted_set_remove("z", ["r"]),
                ops.expire("s", 60000),
                ops.publish("channel", "message"),
            ]
        if probe == "bad-key":
            return [ops.set(None, "x")]
        if probe == "bad-ttl":
            return [ops.set("k", "v", -1)]
        if probe == "not-a-list":
            return "nothing"
        if probe == "not-an-op":
            return [("increment", "k")]
        if probe == "throw-string":
            raise KeyError("plain")
        raise ValueError(f"unknown probe {probe!r}")


Transform = export_plugin(Probe)
