"""Provider adapters: one provider call per outbox item, classified into an Outcome.

Adapters are found by entry point (group `kernel_driver.providers`); see docs/providers.md.
"""

from kernel_driver.providers.base import (
    ENTRY_POINT_GROUP,
    OutboundItem,
    Outcome,
    ProviderAdapter,
    ProviderConfigError,
    SendResult,
    installed_providers,
    load_adapter,
    open_adapter,
    outbox_outcome,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "OutboundItem",
    "Outcome",
    "ProviderAdapter",
    "ProviderConfigError",
    "SendResult",
    "installed_providers",
    "load_adapter",
    "open_adapter",
    "outbox_outcome",
]
