"""Voice calls through the Twilio Calls API (or anything that speaks it, such as VoiceSink)."""

from __future__ import annotations

import base64
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

from kernel_driver.providers._http import HttpAdapter, HttpClient, HttpReply, HttpRequest
from kernel_driver.providers.base import OutboundItem, Outcome, SendResult
from kernel_driver.providers.settings import Setting, env_name, http_url, positive_number, text


class TwilioAdapter(HttpAdapter):
    """Creates one call per item; the Call SID is the provider message id.

    Twilio does not deduplicate call creation by key, so an AMBIGUOUS call ends `unknown`.
    """

    name = "twilio"
    channels = frozenset({"voice"})
    deduplicates = False
    settings_schema = {
        "base_url": Setting(http_url, default="https://api.twilio.com"),
        "account_sid": Setting(text, required=True),
        "auth_token_env": Setting(env_name, required=True),
        "from": Setting(text),  # default caller id; the item's content["from"] wins
        "timeout_s": Setting(positive_number, default=10),
    }

    def prepare(self) -> None:
        sid = self.settings["account_sid"]
        credentials = f"{sid}:{self.secret('auth_token_env')}".encode()
        self._authorization = "Basic " + base64.b64encode(credentials).decode()
        self._calls_url = (
            f"{self.settings['base_url'].rstrip('/')}/2010-04-01/Accounts/{quote(sid)}/Calls.json"
        )
        self._http = HttpClient(self.settings["timeout_s"], self.concurrency)

    def request(self, item: OutboundItem) -> HttpRequest | SendResult:
        caller = item.content.get("from") or self.settings["from"]
        script = item.content.get("script")
        if not caller or not script:
            missing = "a caller id (content 'from' or setting 'from')" if not caller else "content 'script'"
            return SendResult.failed(Outcome.REJECTED, f"voice item lacks {missing}")
        form = {
            "To": item.recipient,
            "From": caller,
            "Twiml": f"<Response><Say>{escape(script)}</Say></Response>",
        }
        headers = {
            "Authorization": self._authorization,
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "I-Twilio-Idempotency-Token": item.idempotency_key,
        }
        return HttpRequest(self._calls_url, urlencode(form).encode(), headers, _call_sid)


def _call_sid(reply: HttpReply) -> str | None:
    parsed = reply.json()
    return parsed.get("sid") if isinstance(parsed, dict) else None
