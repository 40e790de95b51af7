// sdk-probe-js: answers "probe" records with what the keepwarm-guest helper makes of them, so
// that tests/all/languages.rs can check the helper inside QuickJS through `keepwarm test`.
// Each change's record is {"probe": NAME, ...}; the answer is a list of operations.

import {
  KeyTemplate,
  exportPlugin,
  keyPart,
  log,
  ops,
  stringifyJson,
  utf8,
} from "keepwarm-guest";

class Probe {
  constructor(config) {
    if (config.fail !== undefined) throw new Error(`asked to fail: ${config.fail}`);
  }

  handle(change) {
    const record = change.record();
    switch (record.probe) {
      case "json":
        return [ops.set("json", stringifyJson(record.value)), ops.set("type", typeof record.value)];
      case "score":
        return [ops.sortedSetAdd("z", [[record.value, "m"]])];
      case "key":
        return [ops.set(new KeyTemplate(record.template).render(change), "x")];
      case "key-part":
        return [ops.set(keyPart(record.value), "x")];
      case "utf8":
        return [ops.set("bytes", utf8(record.value)), ops.set("text", record.value)];
      case "change":
        log.info(`probing ${change.action} of ${change.table}`);
        return [
          ops.set(
            "change",
            stringifyJson({
              action: change.action,
              schema: change.schema,
              table: change.table,
              pks: change.pks,
              version: change.version(),
              old: change.oldValues(),
              toast: change.hasUnchangedToast(),
              isDelete: change.isDelete,
              timestamp: change.commitTimestamp,
              idempotencyKey: change.idempotencyKey,
              metadataKeys: Object.keys(change.metadata()).sort(),
            }),
          ),
        ];
      case "all-ops":
        return [
          ops.set("s", "v", 1500),
          ops.set("b", new Uint8Array([0, 255])),
          ops.del(7),
          ops.hashSet("h", { a: "1", b: "2" }),
          ops.hashSet("h2", new Map([["c", "3"]])),
          ops.hashDel("h", ["a"]),
          ops.setAdd("set", ["x", 9007199254740993n]),
          ops.setRemove("set", new Set(["y"])),
          ops.sortedSetAdd("z", [["149.90", "p"], [2n, "q"]]),
          ops.sortedSetRemove("z", ["r"]),
          ops.expire("s", 60000),
          ops.publish("channel", "message"),
        ];
      case "bad-key":
        return [ops.set(null, "x")];
      case "bad-ttl":
        return [ops.set("k", "v", -1)];
      case "not-a-list":
        return "nothing";
      case "not-an-op":
        return [{ tag: "increment", val: "k" }];
      case "throw-string":
        throw "a plain string";
      default:
        throw new Error(`unknown probe ${JSON.stringify(record.probe)}`);
    }
  }
}

export const transform = exportPlugin(Probe);
