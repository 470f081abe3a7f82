"""NGSI-LD subscriptions: the model, change matching, a persistent outbox and its dispatcher.

Data flow: a write computes a :class:`ChangeEvent` per entity, :class:`SubscriptionIndex`
finds the subscriptions it fires and renders their notifications as :class:`OutboxItem`
rows, :meth:`Outbox.enqueue` stores them in the write's own transaction, and the
:class:`Dispatcher` (woken after the commit) delivers them over HTTP or MQTT.
"""

from cityward.bank.subscriptions.dispatcher import (
    DeliveryError,
    DeliveryResult,
    Dispatcher,
    EndpointStats,
    Http1Transport,
    HttpTransport,
    MqttTransport,
    RetryPolicy,
    Transport,
)
from cityward.bank.subscriptions.hook import NotificationHook
from cityward.bank.subscriptions.matcher import (
    ChangeEvent,
    Fire,
    SubscriptionIndex,
    build_notification,
    evaluate,
    notification_for,
    render_data,
)
from cityward.bank.subscriptions.model import (
    DEFAULT_TRIGGERS,
    TRIGGERS,
    DeliveryStats,
    Endpoint,
    EntitySelector,
    GeoQ,
    NotificationParams,
    Subscription,
    Trigger,
    apply_patch,
    parse_subscription,
)
from cityward.bank.subscriptions.outbox import (
    Outbox,
    OutboxDB,
    OutboxItem,
    PostgresOutboxDB,
    SqliteOutboxDB,
)

__all__ = [
    "DEFAULT_TRIGGERS",
    "TRIGGERS",
    "ChangeEvent",
    "DeliveryError",
    "DeliveryResult",
    "DeliveryStats",
    "Dispatcher",
    "Endpoint",
    "EndpointStats",
    "EntitySelector",
    "Fire",
    "GeoQ",
    "Http1Transport",
    "HttpTransport",
    "MqttTransport",
    "NotificationHook",
    "NotificationParams",
    "Outbox",
    "OutboxDB",
    "OutboxItem",
    "PostgresOutboxDB",
    "RetryPolicy",
    "SqliteOutboxDB",
    "Subscription",
    "SubscriptionIndex",
    "Transport",
    "Trigger",
    "apply_patch",
    "build_notification",
    "evaluate",
    "notification_for",
    "parse_subscription",
    "render_data",
]
