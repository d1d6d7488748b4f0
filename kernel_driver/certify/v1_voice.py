"""V1: one voice call through the Twilio-style provider, its call id stored."""

from __future__ import annotations

from kernel_driver.certify.harness import Certification, deliver_one, sink_environment
from kernel_driver.certify.records import CheckRecord, expect
from kernel_driver.testing.seed import default_content
from kernel_driver.testing.sinks import VoiceSink


def check_voice(cert: Certification, record: CheckRecord) -> None:
    if cert.real_voice:
        settings = cert.real_voice.settings
        content = {**default_content("voice"), "from": settings["from"]}
        deliver_one(cert, record, "voice", "twilio", settings, to=cert.real_voice.to, content=content)
        record.measurements["api"] = settings.get("base_url", "https://api.twilio.com")
        record.measurements["received"] = "call created by the provider: see its call log for the call id"
        return
    with VoiceSink() as sink:
        record.measurements["api"] = f"local voice sink {sink.url}"
        item = deliver_one(cert, record, "voice", "twilio", sink.provider_settings(), env=sink_environment(sink))
        calls = sink.calls
    received = [c for c in calls if c.sid == item["provider_message_id"] and c.to == item["recipient"]]
    record.measurements["received"] = bool(received)
    expect(
        len(received) == 1 and len(calls) == 1,
        f"the voice API should have one call {item['provider_message_id']} to {item['recipient']};"
        f" it has {[(c.sid, c.to) for c in calls]}",
    )
