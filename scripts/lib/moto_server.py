"""moto's server, the SQS emulator of the tests (scripts/lib/moto.sh), with one race of moto's fixed.

moto's `Queue.delete_message` writes back the queue's message list without taking the lock that
`Queue.add_message` takes, and moto serves each request on a thread of its own. Two
`DeleteMessageBatch` calls at once (keepwarm sends up to 16) can then each write back a list that
still holds the other's message: that message returns after its visibility timeout, which SQS
never does. Sixteen threads deleting 400 received messages in batches of 10, ten times over,
lost 20 of the 4,000 deletes (none with this fix, in 8,000); a plain-mode order test then saw
an old version of a row applied last. Here the write takes the queue's lock: SQS's own deletes
are atomic.
"""

import threading

import moto.sqs.models as sqs_models
from moto.server import main

_fallback_lock = threading.RLock()
_delete_message = sqs_models.Queue.delete_message


def _locked_delete_message(self, receipt_handle):
    with getattr(self, "_messages_lock", None) or _fallback_lock:
        return _delete_message(self, receipt_handle)


sqs_models.Queue.delete_message = _locked_delete_message

if __name__ == "__main__":
    main()
