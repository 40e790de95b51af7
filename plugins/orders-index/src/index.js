// orders-index: one Redis set per customer holding the ids of that customer's orders.
//
//   insert, read                     SADD orders:by_customer:<customer_id> <order id>
//   update, customer unchanged       SADD orders:by_customer:<customer_id> <order id>
//   update moving the order          SREM orders:by_customer:<old customer_id> <order id>
//     (`changes` holds the old         SADD orders:by_customer:<new customer_id> <order id>
//      customer_id)
//   delete                           SREM orders:by_customer:<customer_id> <order id>
//   customer_id null                 no set (an update to null only removes from the old set)
//
// The order id is the primary key (`{pks}`), the customer id the `customer_id` column, both as
// their exact digits: a bigint id beyond 2^53 is kept exact by `change.record()`.
//
// Deletes need REPLICA IDENTITY FULL on the table. Without it Postgres logs only the primary
// key of a deleted row, so the delete does not say which customer's set holds the order; such a
// delete is rejected (dead-lettered with the reason) rather than leaving a stale member behind
// silently. Likewise an update only shows a move when `changes` has the old customer_id, which
// also needs FULL identity: with DEFAULT identity `changes` is `{}` and a moved order stays in
// its old set too.
//
// [config] (all optional): `key_prefix` (default "orders:by_customer:"), `group_by` (the column
// naming the set, default "customer_id").

import { exportPlugin, expectConfigKeys, keyPart, ops } from "keepwarm-guest";

class OrdersIndex {
  constructor(config) {
    expectConfigKeys(config, ["key_prefix", "group_by"]);
    this.prefix = config.key_prefix ?? "orders:by_customer:";
    this.column = config.group_by ?? "customer_id";
    if (typeof this.prefix !== "string" || typeof this.column !== "string" || this.column === "") {
      throw new Error("key_prefix and group_by must be strings");
    }
  }

  /** The set of `group`, or null when the order belongs to no group. */
  setKey(group) {
    return group === null || group === undefined ? null : this.prefix + keyPart(group);
  }

  handle(change) {
    const order = change.pks.join(":");
    const record = change.record();
    if (!Object.hasOwn(record, this.column)) {
      throw new Error(`column ${this.column} is missing from the record`);
    }
    const current = this.setKey(record[this.column]);
    switch (change.action) {
      case "insert":
      case "read":
        return current === null ? [] : [ops.setAdd(current, [order])];
      case "update": {
        const old = change.oldValues() ?? {};
        const out = [];
        if (Object.hasOwn(old, this.column)) {
          const previous = this.setKey(old[this.column]);
          if (previous !== null && previous !== current) out.push(ops.setRemove(previous, [order]));
        }
        if (current !== null) out.push(ops.setAdd(current, [order]));
        return out;
      }
      case "delete":
        if (current === null) {
          throw new Error(
            `delete of ${change.schema}.${change.table} ${order} carries no ${this.column}, so the ` +
              `set holding it is unknown: give the table REPLICA IDENTITY FULL`,
          );
        }
        return [ops.setRemove(current, [order])];
      default:
        throw new Error(`unknown action ${change.action}`);
    }
  }
}

export const transform = exportPlugin(OrdersIndex);
