// keepwarm-guest: write keepwarm plugins in JavaScript.
//
// A plugin module exports `transform`, built from a class (or an object) with a `handle(change)`
// method that returns the cache operations for one change:
//
//   import { exportPlugin, ops } from "keepwarm-guest";
//
//   class UserEmails {
//     constructor(config) { this.prefix = config.prefix ?? "user:"; }
//     handle(change) {
//       const key = this.prefix + change.pks[0];
//       if (change.isDelete) return [ops.del(key)];
//       return [ops.set(key, change.record().email)];
//     }
//   }
//
//   export const transform = exportPlugin(UserEmails);
//
// The same concepts as the Rust SDK (guest-sdk/src): `Change` (typed access to one change),
// `ops` (one builder per operation), `KeyTemplate` (keys such as `{schema}.{table}:{pks}`),
// the manifest's `[config]` table handed to the constructor, and `log`. See guest-sdk/README.md.
//
// Numbers: `JSON.parse` turns every number into a double, so an `int8` id above 2^53 silently
// changes. `change.record()` and `parseJson` parse exactly instead: an integer outside the safe
// range becomes a BigInt (exact digits), everything else is what `JSON.parse` gives. Postgres
// `numeric` columns arrive as strings ("149.90", "1E-7"): keep them as strings for storage, and
// use `toScore` only where a double is wanted (a sorted-set score).

import hostConfig from "keepwarm:plugin/config@0.1.0";
import hostLog from "keepwarm:plugin/log@0.1.0";

/** The placeholder Sequin writes for an unchanged TOASTed column of an update. */
export const UNCHANGED_TOAST = "unchanged_toast";

// ---------------------------------------------------------------------------------------------
// Exact JSON

/** A run of 16 digits: the only way a JSON text can hold an integer beyond 2^53. */
const LONG_DIGITS = /\d{16}/;
const INTEGER_TEXT = /^-?\d+$/;

/** Whether this engine passes the source text to `JSON.parse` revivers (QuickJS-ng does). */
const REVIVER_HAS_SOURCE = (() => {
  let source;
  try {
    JSON.parse("1", (_key, value, context) => {
      source = context && context.source;
      return value;
    });
  } catch (_error) {
    return false;
  }
  return source === "1";
})();

function exactReviver(_key, value, context) {
  if (
    typeof value === "number" &&
    !Number.isSafeInteger(value) &&
    context !== undefined &&
    INTEGER_TEXT.test(context.source)
  ) {
    return BigInt(context.source);
  }
  return value;
}

/**
 * Parses JSON text like `JSON.parse`, except that an integer outside ±(2^53 − 1) becomes a
 * BigInt holding its exact digits (`9007199254740993` stays 9007199254740993n).
 * @param {string} text
 * @returns {any}
 */
export function parseJson(text) {
  if (!LONG_DIGITS.test(text)) {
    return JSON.parse(text); // No integer can be out of range: the fast native parse is exact.
  }
  if (!REVIVER_HAS_SOURCE) {
    throw new Error("this JavaScript engine cannot parse integers beyond 2^53 exactly");
  }
  return JSON.parse(text, exactReviver);
}

/**
 * `JSON.stringify` that writes BigInts as their exact digits, so `parseJson` output round-trips.
 * @param {any} value
 * @returns {string}
 */
export function stringifyJson(value) {
  return JSON.stringify(value, (_key, v) =>
    typeof v === "bigint" ? JSON.rawJSON(v.toString()) : v,
  );
}

/**
 * A sorted-set score from a column value: a number, a BigInt, or a numeric string as Postgres
 * `numeric` columns arrive ("149.90", "1E-7", "Infinity"). The only lossy step is the final
 * conversion to a double, which is what a Redis score is.
 * @param {number | bigint | string} value
 * @returns {number}
 */
export function toScore(value) {
  let score;
  if (typeof value === "number") {
    score = value;
  } else if (typeof value === "bigint") {
    score = Number(value);
  } else if (typeof value === "string" && value.trim() !== "") {
    score = Number(value);
  } else {
    throw new Error(`not a number: ${describe(value)}`);
  }
  if (Number.isNaN(score)) {
    throw new Error(`not a number: ${describe(value)}`);
  }
  return score;
}

/**
 * The text of a column value as it goes into a key or a member: a string as is, a number or
 * BigInt as its digits, a boolean as `true`/`false`. `null`, `undefined`, objects and arrays
 * are errors.
 * @param {unknown} value
 * @returns {string}
 */
export function keyPart(value) {
  switch (typeof value) {
    case "string":
      return value;
    case "number":
    case "bigint":
    case "boolean":
      return String(value);
    default:
      throw new Error(`${describe(value)} cannot be part of a key`);
  }
}

function describe(value) {
  if (value === null || value === undefined) return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `${typeof value} ${String(value)}`;
}

// ---------------------------------------------------------------------------------------------
// Change

/** One change to one row, as the host delivered it. */
export class Change {
  /** @param {object} wit the WIT `change` record */
  constructor(wit) {
    /** The WIT record this change wraps. */
    this.wit = wit;
    /** "insert", "update", "delete" or "read" (a backfill row). */
    this.action = wit.action;
    /** The Postgres schema of the table, e.g. "public". */
    this.schema = wit.schema;
    /** The table name (a partition reports its parent's name). */
    this.table = wit.table;
    /** The row as JSON text, byte for byte as delivered: cache it as is. */
    this.recordJson = wit.record;
    /** For updates, the old values of the changed columns as JSON text ("{}" when the table's
     * replica identity is not FULL); null for insert, delete and read. */
    this.oldJson = wit.changes ?? null;
    /** The primary-key values as strings, in primary-key column order. */
    this.pks = wit.pks;
    /** The commit LSN (a number: exact up to 2^53 bytes of WAL); null on backfill reads. */
    this.commitLsn = wit.commitLsn ?? null;
    /** The position of the change in its transaction; null on backfill reads. */
    this.commitIdx = wit.commitIdx ?? null;
    /** The commit time (RFC 3339, UTC); for reads, the time the row was read. */
    this.commitTimestamp = wit.commitTimestamp;
    /** Sequin's idempotency key. */
    this.idempotencyKey = wit.idempotencyKey;
    /** The whole `metadata` object of the message as JSON text. */
    this.metadataJson = wit.metadata;
    this._record = undefined;
  }

  /** Whether the row is gone after this change. */
  get isDelete() {
    return this.action === "delete";
  }

  /**
   * The row, parsed exactly (see `parseJson`) once and kept. For a delete of a table without
   * REPLICA IDENTITY FULL only the primary-key columns are set; the others are null.
   * @returns {Record<string, any>}
   */
  record() {
    if (this._record === undefined) {
      this._record = parseObject("record", this.recordJson);
    }
    return this._record;
  }

  /**
   * The old values of an update's changed columns, parsed exactly; `{}` when the table's replica
   * identity is not FULL (the old values are unknown), null for insert, delete and read.
   * @returns {Record<string, any> | null}
   */
  oldValues() {
    return this.oldJson === null ? null : parseObject("changes", this.oldJson);
  }

  /** The `metadata` object, parsed exactly. */
  metadata() {
    return parseObject("metadata", this.metadataJson);
  }

  /** `[commitLsn, commitIdx]`, or null for a backfill read. */
  version() {
    return this.commitLsn === null || this.commitIdx === null
      ? null
      : [this.commitLsn, this.commitIdx];
  }

  /**
   * Whether a column holds Sequin's "unchanged_toast" placeholder: a large value the update did
   * not carry. Never cache such a record whole; delete the key, or skip that column.
   */
  hasUnchangedToast() {
    if (!this.recordJson.includes(UNCHANGED_TOAST) && !this.recordJson.includes("\\u")) {
      return false;
    }
    return Object.values(this.record()).some((value) => value === UNCHANGED_TOAST);
  }
}

function parseObject(what, text) {
  let value;
  try {
    value = parseJson(text);
  } catch (error) {
    throw new Error(`${what}: ${messageOf(error)}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Error(`${what} is not a JSON object`);
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Key templates

/**
 * A key template such as `{schema}.{table}:{pks}`, parsed once and rendered per change:
 * `{schema}`, `{table}`, `{pks}` (primary-key values joined with ":"), `{pk0}`, `{pk1}`, ...,
 * `{column}` (a column of the record, see `keyPart`), and `{{`/`}}` for literal braces.
 */
export class KeyTemplate {
  /** @param {string} text */
  constructor(text) {
    this.text = text;
    this.parts = parseTemplate(text);
  }

  /** Parses a template; throws on a malformed one. */
  static parse(text) {
    return new KeyTemplate(text);
  }

  /**
   * The key for `change`; throws, naming the placeholder, when a value is missing.
   * @param {Change} change
   * @returns {string}
   */
  render(change) {
    let key = "";
    for (const part of this.parts) {
      if (typeof part === "string") {
        key += part;
      } else if (part.kind === "schema") {
        key += change.schema;
      } else if (part.kind === "table") {
        key += change.table;
      } else if (part.kind === "pks") {
        if (change.pks.length === 0) this.fail("{pks}: the change has no primary-key values");
        key += change.pks.join(":");
      } else if (part.kind === "pk") {
        if (part.index >= change.pks.length) {
          this.fail(
            `{pk${part.index}} is past the last primary-key value (the change has ${change.pks.length})`,
          );
        }
        key += change.pks[part.index];
      } else {
        const record = change.record();
        if (!Object.hasOwn(record, part.name)) {
          this.fail(`column "${part.name}" is missing from the record`);
        }
        const value = record[part.name];
        if (value === null) this.fail(`column "${part.name}" is null`);
        if (typeof value === "object") {
          this.fail(`column "${part.name}" is not a string, number or boolean`);
        }
        key += keyPart(value);
      }
    }
    return key;
  }

  fail(reason) {
    throw new Error(`key template ${JSON.stringify(this.text)}: ${reason}`);
  }
}

/** Renders `template` for `change`; see `KeyTemplate`. */
export function formatKey(template, change) {
  return new KeyTemplate(template).render(change);
}

function parseTemplate(text) {
  const fail = (reason) => {
    throw new Error(`key template ${JSON.stringify(text)}: ${reason}`);
  };
  if (typeof text !== "string" || text === "") throw new Error("key template is empty");
  const parts = [];
  let literal = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if ((c === "{" || c === "}") && text[i + 1] === c) {
      literal += c;
      i++;
    } else if (c === "}") {
      fail(`unmatched '}' at ${i} (write '}}' for a literal brace)`);
    } else if (c === "{") {
      const end = text.slice(i + 1).search(/[{}]/);
      if (end < 0 || text[i + 1 + end] !== "}") {
        fail(`unclosed '{' at ${i} (write '{{' for a literal brace)`);
      }
      const name = text.slice(i + 1, i + 1 + end);
      if (name === "") fail(`empty placeholder '{}' at ${i}`);
      if (literal !== "") parts.push(literal);
      literal = "";
      parts.push(placeholder(name));
      i += end + 1;
    } else {
      literal += c;
    }
  }
  if (literal !== "") parts.push(literal);
  return parts;
}

function placeholder(name) {
  if (name === "schema" || name === "table" || name === "pks") return { kind: name };
  const pk = /^pk(\d+)$/.exec(name);
  if (pk) return { kind: "pk", index: Number(pk[1]) };
  return { kind: "column", name };
}

// ---------------------------------------------------------------------------------------------
// Operations

/**
 * UTF-8 bytes of a string (the engine has no TextEncoder). Lone surrogates become U+FFFD.
 * @param {string} text
 * @returns {Uint8Array}
 */
export function utf8(text) {
  const out = new Uint8Array(text.length * 3);
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    let c = text.charCodeAt(i);
    if (c < 0x80) {
      out[n++] = c;
    } else if (c < 0x800) {
      out[n++] = 0xc0 | (c >> 6);
      out[n++] = 0x80 | (c & 0x3f);
    } else {
      if (c >= 0xd800 && c <= 0xdbff && (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
        c = 0x10000 + ((c - 0xd800) << 10) + (text.charCodeAt(++i) - 0xdc00);
        out[n++] = 0xf0 | (c >> 18);
        out[n++] = 0x80 | ((c >> 12) & 0x3f);
      } else {
        if (c >= 0xd800 && c <= 0xdfff) c = 0xfffd;
        out[n++] = 0xe0 | (c >> 12);
      }
      out[n++] = 0x80 | ((c >> 6) & 0x3f);
      out[n++] = 0x80 | (c & 0x3f);
    }
  }
  return out.slice(0, n);
}

function text(what, value) {
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "bigint") return String(value);
  throw new Error(`${what} must be a string, got ${describe(value)}`);
}

function bytes(what, value) {
  if (value instanceof Uint8Array) return value;
  if (typeof value === "string") return utf8(value);
  throw new Error(`${what} must be a string or a Uint8Array, got ${describe(value)}`);
}

function millis(what, value) {
  if (typeof value === "bigint") value = Number(value);
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new Error(`${what} must be a whole number of milliseconds, got ${describe(value)}`);
  }
  return value;
}

function list(what, values, each) {
  if (typeof values === "string" || values == null || typeof values[Symbol.iterator] !== "function") {
    throw new Error(`${what} must be an array, got ${describe(values)}`);
  }
  return Array.from(values, each);
}

function members(key, values) {
  return {
    key: text("key", key),
    members: list("members", values, (member) => text("member", member)),
  };
}

/**
 * Builders for the cache operations, one per WIT `op` case. Keys and members take strings
 * (numbers and BigInts are written as their digits); values take strings (stored as UTF-8) or
 * Uint8Arrays; expiries are milliseconds. Each checks its arguments, so a mistake rejects the
 * change with a message instead of trapping the instance.
 */
export const ops = {
  /** `SET key value [PX ttlMs]`. */
  set(key, value, ttlMs = null) {
    return {
      tag: "set",
      val: {
        key: text("key", key),
        value: bytes("value", value),
        ttlMs: ttlMs === null || ttlMs === undefined ? null : millis("ttlMs", ttlMs),
      },
    };
  },
  /** `DEL key`. */
  del(key) {
    return { tag: "del", val: text("key", key) };
  },
  /** `HSET key field value ...`; `fields` is an object or a list of `[field, value]` pairs. */
  hashSet(key, fields) {
    if (fields === null || typeof fields !== "object") {
      throw new Error(`fields must be an object or a list of [field, value] pairs, got ${describe(fields)}`);
    }
    const pairs = typeof fields[Symbol.iterator] === "function" ? fields : Object.entries(fields);
    return {
      tag: "hash-set",
      val: {
        key: text("key", key),
        fields: list("fields", pairs, ([field, value]) => ({
          field: text("field", field),
          value: bytes(`value of field ${field}`, value),
        })),
      },
    };
  },
  /** `HDEL key field ...`. */
  hashDel(key, fields) {
    return { tag: "hash-del", val: members(key, fields) };
  },
  /** `SADD key member ...`. */
  setAdd(key, values) {
    return { tag: "set-add", val: members(key, values) };
  },
  /** `SREM key member ...`. */
  setRemove(key, values) {
    return { tag: "set-remove", val: members(key, values) };
  },
  /** `ZADD key score member ...`; `scored` is a list of `[score, member]` pairs. */
  sortedSetAdd(key, scored) {
    return {
      tag: "sorted-set-add",
      val: {
        key: text("key", key),
        members: list("members", scored, ([score, member]) => ({
          score: toScore(score),
          member: text("member", member),
        })),
      },
    };
  },
  /** `ZREM key member ...`. */
  sortedSetRemove(key, values) {
    return { tag: "sorted-set-remove", val: members(key, values) };
  },
  /** `PEXPIRE key ttlMs`. */
  expire(key, ttlMs) {
    return { tag: "expire", val: { key: text("key", key), ttlMs: millis("ttlMs", ttlMs) } };
  },
  /** `PUBLISH channel message`: an invalidation broadcast for in-process caches. */
  publish(channel, message) {
    return {
      tag: "publish",
      val: { channel: text("channel", channel), message: bytes("message", message) },
    };
  },
};

const OP_TAGS = new Set([
  "set",
  "del",
  "hash-set",
  "hash-del",
  "set-add",
  "set-remove",
  "sorted-set-add",
  "sorted-set-remove",
  "expire",
  "publish",
]);

/** Checks what `handle` returned: a list of operations made by `ops`. */
function checkOps(result) {
  if (!Array.isArray(result)) {
    throw new Error(`handle must return an array of operations, got ${describe(result)}`);
  }
  for (const op of result) {
    if (op === null || typeof op !== "object" || !OP_TAGS.has(op.tag) || op.val === undefined) {
      throw new Error(`handle returned ${describe(op)} where an operation (from ops) was expected`);
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Logging, configuration, export

function write(level, message) {
  hostLog.log(level, String(message));
}

/** Log lines, tagged with the plugin's name and rate-limited by the host. */
export const log = {
  debug: (message) => write("debug", message),
  info: (message) => write("info", message),
  warn: (message) => write("warn", message),
  error: (message) => write("error", message),
};

/**
 * Throws when `config` has a key not in `known`: call it in the constructor so that a misspelt
 * key in the manifest's `[config]` fails loudly.
 * @param {Record<string, unknown>} config
 * @param {string[]} known
 */
export function expectConfigKeys(config, known) {
  for (const key of Object.keys(config)) {
    if (!known.includes(key)) {
      throw new Error(`unknown key ${JSON.stringify(key)} (expected one of ${known.join(", ")})`);
    }
  }
}

function messageOf(error) {
  if (error instanceof Error) return error.message;
  return typeof error === "string" ? error : describe(error);
}

/**
 * Exports a plugin as the component's `transform` interface:
 * `export const transform = exportPlugin(MyPlugin)`.
 *
 * `plugin` is a class, built once per instance as `new plugin(config)` with the manifest's
 * `[config]` table (parsed exactly), or an object; either has `handle(change)` returning a list of
 * operations. A value thrown by `handle` rejects that change alone, with the error's message as
 * the reason (it goes to the dead-letter stream). A value thrown by the constructor rejects every
 * change with "plugin configuration: <message>".
 * @param {Function | {handle(change: Change): object[]}} plugin
 */
export function exportPlugin(plugin) {
  let instance = null;
  let configError = null;
  const setUp = () => {
    try {
      const config = parseObject("config", hostConfig.get());
      instance = typeof plugin === "function" ? new plugin(config) : plugin;
      if (instance === null || typeof instance.handle !== "function") {
        throw new Error("the plugin has no handle(change) method");
      }
    } catch (error) {
      configError = `plugin configuration: ${messageOf(error)}`;
    }
  };
  return {
    handleBatch(changes) {
      if (instance === null && configError === null) setUp();
      return changes.map((wit) => {
        if (configError !== null) return { tag: "err", val: configError };
        try {
          return { tag: "ok", val: checkOps(instance.handle(new Change(wit))) };
        } catch (error) {
          return { tag: "err", val: messageOf(error) };
        }
      });
    },
  };
}
