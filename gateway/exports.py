"""Usage events mapped to billing providers' event shapes (`gateway usage export --format ...`).

Every mapping sends the charge as integer micro-credits (`credits_micro`, 1 credit = 1,000,000):
billing meters sum a numeric property, an integer sums exactly (a decimal string or a float would
not, or would be refused), and the price per unit is set in the provider (per micro-credit, or per
credit with a divide-by-1,000,000 transform). The event's own id (the request id) is each provider's
idempotency key, so a re-sent export is counted once. The customer is the account's `external_id`
(the provider's customer id), else the account id.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

EVENT_SOURCE = "metering-gateway"
METER_NAME = "gateway_credits"  # Stripe meter `event_name`, Lago billable metric `code`
OPENMETER_TYPE = "gateway.usage"  # CloudEvent `type`: the OpenMeter meter's `eventType`
#: The usage quantities carried beside the charge (Lago properties, OpenMeter data): a meter may sum
#: any of them, group by model, provider or key.
_QUANTITIES = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
               "output_tokens", "reasoning_tokens")


def customer(view: dict[str, Any]) -> str:
    """The provider's customer for a usage view: its account's external id, else the account id."""
    return str(view.get("external_id") or view["account_id"])


def _seconds(view: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(str(view["time"]).replace("Z", "+00:00")).timestamp())


def stripe_meter_event(view: dict[str, Any]) -> dict[str, Any]:
    """Stripe Billing `POST /v1/billing/meter_events`: the payload's values are strings (Stripe's
    payload is a string map), `value` the micro-credits, `identifier` our event id (Stripe dedups
    it), `timestamp` in unix seconds."""
    return {"event_name": METER_NAME, "identifier": str(view["id"]), "timestamp": _seconds(view),
            "payload": {"stripe_customer_id": customer(view), "value": str(int(view["credits_micro"]))}}


def lago_event(view: dict[str, Any]) -> dict[str, Any]:
    """Lago `POST /api/v1/events` (the `event` object): `transaction_id` our event id (Lago dedups it),
    `external_customer_id` the account's external id, `code` the billable metric, `timestamp` in unix
    seconds; `properties.credits_micro` is the value a sum metric aggregates."""
    properties: dict[str, Any] = {"credits_micro": int(view["credits_micro"]), "credits": view["credits"],
                                  "model": view.get("model"), "provider": view.get("provider"),
                                  "key_id": view.get("key_id")}
    properties.update({name: int(view.get(name) or 0) for name in _QUANTITIES})
    return {"transaction_id": str(view["id"]), "external_customer_id": customer(view), "code": METER_NAME,
            "timestamp": _seconds(view), "properties": {k: v for k, v in properties.items() if v is not None}}


def openmeter_event(view: dict[str, Any]) -> dict[str, Any]:
    """OpenMeter ingest (`POST /api/v1/events`, a CloudEvent 1.0): `subject` the customer, `type` the
    meter's event type, `data.credits_micro` the value a SUM meter reads (`$.credits_micro`)."""
    data: dict[str, Any] = {"credits_micro": int(view["credits_micro"]), "credits": view["credits"],
                            "usd_micro": int(view.get("usd_micro") or 0), "model": view.get("model"),
                            "provider": view.get("provider"), "key_id": view.get("key_id"),
                            "account_id": view["account_id"]}
    data.update({name: int(view.get(name) or 0) for name in _QUANTITIES})
    return {"specversion": "1.0", "id": str(view["id"]), "type": OPENMETER_TYPE, "source": EVENT_SOURCE,
            "subject": customer(view), "time": view["time"], "datacontenttype": "application/json",
            "data": {k: v for k, v in data.items() if v is not None}}


PROVIDER_FORMATS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "stripe": stripe_meter_event, "lago": lago_event, "openmeter": openmeter_event}
