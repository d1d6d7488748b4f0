"""E1: one e-mail through the SMTP provider, its provider_message_id stored."""

from __future__ import annotations

from kernel_driver.certify.harness import Certification, deliver_one
from kernel_driver.certify.records import CheckRecord, expect
from kernel_driver.testing.sinks import SmtpSink


def check_email(cert: Certification, record: CheckRecord) -> None:
    if cert.real_email:
        deliver_one(cert, record, "email", "smtp", cert.real_email.settings, to=cert.real_email.to)
        record.measurements["server"] = f"{cert.real_email.settings['host']}:{cert.real_email.settings['port']}"
        record.measurements["received"] = "accepted by the server: confirm receipt in the inbox by Message-ID"
        return
    with SmtpSink() as sink:
        record.measurements["server"] = f"local SMTP sink {sink.url}"
        item = deliver_one(cert, record, "email", "smtp", sink.provider_settings())
        messages = sink.messages
    received = [m for m in messages if m.message_id == item["provider_message_id"] and item["recipient"] in m.rcpt_tos]
    record.measurements["received"] = bool(received)
    expect(
        len(received) == 1 and len(messages) == 1,
        f"the SMTP server should hold one message {item['provider_message_id']} for {item['recipient']};"
        f" it holds {[(m.message_id, m.rcpt_tos) for m in messages]}",
    )
