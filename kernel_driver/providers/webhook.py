"""Hand each item to your own HTTP endpoint as JSON, with an Idempotency-Key header."""

from __future__ import annotations

import hashlib
import hmac
import json

from kernel_driver.providers._http import HttpAdapter, HttpClient, HttpReply, HttpRequest
from kernel_driver.providers.base import OutboundItem
from kernel_driver.providers.settings import Setting, env_name, http_url, positive_number

SIGNATURE_HEADER = "X-Kernel-Signature-256"


def sign(secret: str, body: bytes) -> str:
    """The signature header value: "sha256=" + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookAdapter(HttpAdapter):
    """POSTs one JSON document per item.

    The receiver promises to process each Idempotency-Key once (answering 2xx or 409 for a key
    it has seen), so an AMBIGUOUS item is safely re-sent with the same key: deduplicates=True.
    """

    name = "webhook"
    channels = frozenset({"email", "voice"})
    deduplicates = True
    settings_schema = {
        "url": Setting(http_url, required=True),
        "secret_env": Setting(env_name),
        "timeout_s": Setting(positive_number, default=10),
    }

    def prepare(self) -> None:
        self._signing_secret = self.secret("secret_env")
        self._http = HttpClient(self.settings["timeout_s"], self.concurrency)

    def request(self, item: OutboundItem) -> HttpRequest:
        body = json.dumps(
            {
                "idempotency_key": item.idempotency_key,
                "channel": item.channel,
                "recipient": item.recipient,
                "content": dict(item.content),
                "run_id": item.run_id,
                "contact_id": item.contact_id,
                "item_id": item.id,
            },
            sort_keys=True,
        ).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": item.idempotency_key}
        if self._signing_secret:
            headers[SIGNATURE_HEADER] = sign(self._signing_secret, body)

        def message_id(reply: HttpReply) -> str:
            parsed = reply.json()
            found = parsed.get("id") if isinstance(parsed, dict) else None
            return str(found) if found not in (None, "") else item.idempotency_key

        # 409: the receiver already processed this key, which is what we wanted
        return HttpRequest(self.settings["url"], body, headers, message_id, also_accepted=(409,))
