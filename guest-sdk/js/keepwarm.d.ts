// Types of keepwarm-guest (keepwarm.js), for editors and type checkers. The contract itself is
// wit/v0.1.0/keepwarm.wit (this helper speaks contract 0.1.0, which keepwarm still runs);
// these are its JavaScript shapes as the QuickJS backend of jco maps them.

/** What happened to the row. `read` is a backfill row. */
export type Action = "insert" | "update" | "delete" | "read";

/** The WIT `change` record as the host hands it over. */
export interface WitChange {
  action: Action;
  schema: string;
  table: string;
  record: string;
  changes: string | null;
  pks: string[];
  commitLsn: number | null;
  commitIdx: number | null;
  commitTimestamp: string;
  idempotencyKey: string;
  metadata: string;
}

/** One cache operation: the WIT `op` variant. Build them with `ops`. */
export type Op =
  | { tag: "set"; val: { key: string; value: Uint8Array; ttlMs: number | null } }
  | { tag: "del"; val: string }
  | { tag: "hash-set"; val: { key: string; fields: { field: string; value: Uint8Array }[] } }
  | { tag: "hash-del"; val: { key: string; members: string[] } }
  | { tag: "set-add"; val: { key: string; members: string[] } }
  | { tag: "set-remove"; val: { key: string; members: string[] } }
  | { tag: "sorted-set-add"; val: { key: string; members: { score: number; member: string }[] } }
  | { tag: "sorted-set-remove"; val: { key: string; members: string[] } }
  | { tag: "expire"; val: { key: string; ttlMs: number } }
  | { tag: "publish"; val: { channel: string; message: Uint8Array } };

/** A JSON value as `parseJson` returns it: integers beyond 2^53 are BigInts. */
export type JsonValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | JsonValue[]
  | { [column: string]: JsonValue };

/** A row: column name to value. */
export type Row = { [column: string]: JsonValue };

/** The placeholder Sequin writes for an unchanged TOASTed column of an update. */
export const UNCHANGED_TOAST: "unchanged_toast";

/** `JSON.parse`, except that integers outside ±(2^53 − 1) become exact BigInts. */
export function parseJson(text: string): JsonValue;
/** `JSON.stringify` that writes BigInts as their exact digits. */
export function stringifyJson(value: unknown): string;
/** A sorted-set score from a number, a BigInt or a numeric string ("149.90", "1E-7"); NaN throws. */
export function toScore(value: number | bigint | string): number;
/** A column value as text for a key or member; null, undefined, objects and arrays throw. */
export function keyPart(value: unknown): string;
/** UTF-8 bytes of a string (lone surrogates become U+FFFD). */
export function utf8(text: string): Uint8Array;

/** One change to one row. */
export class Change {
  constructor(wit: WitChange);
  readonly wit: WitChange;
  readonly action: Action;
  readonly schema: string;
  readonly table: string;
  /** The row as JSON text, byte for byte as delivered. */
  readonly recordJson: string;
  /** An update's old values of the changed columns as JSON text ("{}" without REPLICA IDENTITY FULL). */
  readonly oldJson: string | null;
  /** Primary-key values as strings, in primary-key column order. */
  readonly pks: string[];
  readonly commitLsn: number | null;
  readonly commitIdx: number | null;
  readonly commitTimestamp: string;
  readonly idempotencyKey: string;
  readonly metadataJson: string;
  readonly isDelete: boolean;
  /** The row, parsed exactly once and kept. */
  record(): Row;
  /** An update's old values, parsed exactly; null for insert, delete and read. */
  oldValues(): Row | null;
  metadata(): Row;
  /** `[commitLsn, commitIdx]`, or null for a backfill read. */
  version(): [number, number] | null;
  /** Whether a column holds the "unchanged_toast" placeholder. */
  hasUnchangedToast(): boolean;
}

/** A key template such as `{schema}.{table}:{pks}`. */
export class KeyTemplate {
  constructor(text: string);
  static parse(text: string): KeyTemplate;
  readonly text: string;
  render(change: Change): string;
}
export function formatKey(template: string, change: Change): string;

type Text = string | number | bigint;
type Bytes = string | Uint8Array;

/** Operation builders; each checks its arguments and throws on a mistake. */
export const ops: {
  set(key: Text, value: Bytes, ttlMs?: number | null): Op;
  del(key: Text): Op;
  hashSet(
    key: Text,
    fields: { [field: string]: Bytes } | Iterable<[Text, Bytes]>,
  ): Op;
  hashDel(key: Text, fields: Iterable<Text>): Op;
  setAdd(key: Text, members: Iterable<Text>): Op;
  setRemove(key: Text, members: Iterable<Text>): Op;
  sortedSetAdd(key: Text, members: Iterable<[number | bigint | string, Text]>): Op;
  sortedSetRemove(key: Text, members: Iterable<Text>): Op;
  expire(key: Text, ttlMs: number): Op;
  publish(channel: Text, message: Bytes): Op;
};

/** Log lines, tagged with the plugin's name and rate-limited by the host. */
export const log: {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
};

/** Throws when `config` has a key not in `known`. */
export function expectConfigKeys(config: Row, known: string[]): void;

/** A plugin: a class built with the `[config]` table, or an object, with `handle`. */
export interface PluginInstance {
  handle(change: Change): Op[];
}
export type PluginClass = new (config: Row) => PluginInstance;

/** The component's `transform` export. */
export interface Transform {
  handleBatch(changes: WitChange[]): ({ tag: "ok"; val: Op[] } | { tag: "err"; val: string })[];
}

/** Exports a plugin: `export const transform = exportPlugin(MyPlugin)`. */
export function exportPlugin(plugin: PluginClass | PluginInstance): Transform;
