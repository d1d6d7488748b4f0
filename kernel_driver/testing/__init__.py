"""What the certification harness, the demo and the tests run against: local provider sinks
(a real SMTP server, Twilio-like and webhook HTTP servers), the seeder, an embedded PostgreSQL.

It ships in the wheel, but its libraries (aiosmtpd, pgserver) come only with the extra:
``pip install 'kernel-driver[testing]'``. A plain install runs ``migrate``, ``run`` and the
read-only commands without them.
"""
