"""product-catalog: a Redis hash per product and a sorted set ranking products by price.

    insert, update, read  ->  HSET product:<id> name <name> price <price> updated_at <ts>
                              (HDEL of the chosen fields that are null)
                              ZADD products:by_price <price as a double> <id>
    delete                ->  DEL product:<id>, ZREM products:by_price <id>

The price is stored in the hash as the exact numeric string Postgres sent ("4.50" stays "4.50",
never 4.5); only the sorted-set score is a double. A price that is null or NaN takes the product
out of the ranking. A column holding Sequin's "unchanged_toast" placeholder (a large value the
update did not carry) is left as the cache has it. Deletes need only the primary key, so they
work whatever the table's replica identity.

[config] (all optional): `hash_prefix` ("product:"), `fields` (["name", "price", "updated_at"]),
`ranking_key` ("products:by_price"), `price_column` ("price").
"""

import json

from keepwarm_guest import UNCHANGED_TOAST, Plugin, export_plugin, log, ops, to_score


class ProductCatalog(Plugin):
    def __init__(self, config):
        self.expect_config_keys(config, ["hash_prefix", "fields", "ranking_key", "price_column"])
        self.hash_prefix = config.get("hash_prefix", "product:")
        self.fields = config.get("fields", ["name", "price", "updated_at"])
        self.ranking_key = config.get("ranking_key", "products:by_price")
        self.price_column = config.get("price_column", "price")
        if not self.fields or not all(isinstance(field, str) for field in self.fields):
            raise ValueError("fields must be a non-empty list of column names")

    def handle(self, change):
        product = ":".join(change.pks)
        key = self.hash_prefix + product
        if change.is_delete:
            return [ops.delete(key), ops.sorted_set_remove(self.ranking_key, [product])]

        record = change.record()
        present, absent = {}, []
        for field in self.fields:
            if field not in record:
                raise ValueError(f"column {field} is missing from the record")
            value = record[field]
            if value == UNCHANGED_TOAST:
                continue
            if value is None:
                absent.append(field)
            elif isinstance(value, str):
                present[field] = value
            else:
                present[field] = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        out = []
        if present:
            out.append(ops.hash_set(key, present))
        if absent:
            out.append(ops.hash_del(key, absent))

        price = record.get(self.price_column)
        if price == UNCHANGED_TOAST:
            return out
        try:
            score = None if price is None else to_score(price)
        except ValueError:
            log.warn(f"product {product}: price {price!r} cannot rank; left out of the ranking")
            score = None
        if score is None:
            out.append(ops.sorted_set_remove(self.ranking_key, [product]))
        else:
            out.append(ops.sorted_set_add(self.ranking_key, [(score, product)]))
        return out


Transform = export_plugin(ProductCatalog)
